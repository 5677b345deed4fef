"""From one run's results to bench/results/: ratios and targets (targets.py), the
Markdown report (markdown.py), the plots (plots.py), and the files (write.py)."""
