"""searchkit's command-line front end (installed as `searchkit.cli`)."""
