"""handlers stage."""
