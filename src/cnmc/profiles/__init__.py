"""Named params profiles (``cnmc profile NAME``)."""
