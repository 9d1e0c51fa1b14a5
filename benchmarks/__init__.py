"""Benchmarks that print their figures: planner quality against an exact optimum and nos, and scale."""
