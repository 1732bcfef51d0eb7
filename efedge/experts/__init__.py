"""The ExpertFlow runtime: where expert weights live and how they reach the compute."""
