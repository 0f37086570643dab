"""Pure message inspection: facts, rules, detectors, verdicts and transforms.

Nothing in this package does I/O or reads the clock: time is passed in.
"""
