"""Training: the Trainer loop, schedules, checkpoints, plots and the end-to-end recipe.

``peftlab.train(config)`` (this package, called) runs :func:`peftlab.api.train`.
"""

from peftlab._callable import make_callable


def _api_train():
    from peftlab.api import train

    return train


make_callable(__name__, _api_train)
