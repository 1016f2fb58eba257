"""Running a network on images: input layout, colour, batched logits, test-time views."""
