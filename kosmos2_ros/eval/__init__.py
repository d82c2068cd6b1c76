"""`kosmos2-eval`: the paper's grounding benchmarks (RefCOCO/+/g, Flickr30k Entities) on any backend.

datasets.py reads the annotation formats, boxes.py holds IoU and box conversions, metrics.py
the paper's counting rules, runner.py drives a Pipeline over samples (resumable), report.py
writes metrics, the summary and pictures, cli.py is the command.
"""
