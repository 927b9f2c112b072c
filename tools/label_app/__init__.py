"""MONAI Label app for the collection's serving tasks (run it with the label env: ``make label-env``, README.md).

``main.py`` is what ``monailabel start_server --app tools/label_app`` loads; ``lib/infer.py`` holds the infer task.
Both import ``monailabel``, which only the label env has: nothing in .venv imports this package.
"""
