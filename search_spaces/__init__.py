"""The built-in search spaces, one YAML file each; installed as the package `tfsearch.search_spaces`."""
