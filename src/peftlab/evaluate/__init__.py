"""Evaluation: held-out loss and perplexity, generation.

``peftlab.evaluate(config)`` (this package, called) runs :func:`peftlab.api.evaluate`.
"""

from peftlab._callable import make_callable


def _api_evaluate():
    from peftlab.api import evaluate

    return evaluate


make_callable(__name__, _api_evaluate)
