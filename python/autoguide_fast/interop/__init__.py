"""Other people's files and models, read safely."""
