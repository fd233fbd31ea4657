"""Command-line tools that sit beside the stage chain (e.g. importing published weights)."""
