"""Pure tensor algorithms. Nothing here knows about models, files or the CLI."""
