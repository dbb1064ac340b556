"""``peftlab ui``: a local web app over run folders -- runs, live metrics, compare, new run, chat."""
