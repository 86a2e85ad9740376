"""Fixture train.py files for the lab tests (hostile ones included) and a harness that runs the real entry point."""
