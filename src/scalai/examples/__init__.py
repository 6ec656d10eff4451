"""Example jobs built on scalai (imported on demand; they need torch)."""
