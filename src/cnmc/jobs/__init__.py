"""The jobs the CLI and DVC stages run (prepare, train, evaluate, tune, ensemble, report, promote,
explain) and the stage files they are rendered into."""
