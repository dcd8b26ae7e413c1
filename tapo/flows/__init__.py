"""The flows: what a command runs, over stages and trainers."""
