"""Test doubles: models that take their time or fail, pickled into stores by the tests.

In-process apps find this module as the tests do; server processes started by support.LiveServer find
it on their PYTHONPATH (like waitress's tests/fixtureapps), so the same artifacts load in both.
"""

import operator
import time

from sklearn.linear_model import LogisticRegression


class SlowModel:
    """Predicts class 0 for every row, after sleeping `seconds`: holds requests in flight.

    No n_features_in_: a model of no fixed width is not warmed at load, so only the tests' requests sleep."""

    def __init__(self, seconds):
        self.seconds = seconds

    def predict(self, rows):
        time.sleep(self.seconds)
        return [0] * len(rows)


class _Sleep:
    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        return (time.sleep, (self.seconds,))


class SlowToLoad:
    """Pickles as `(time.sleep(seconds), estimator)[1]`: an artifact of `estimator` that takes `seconds` to load
    (a big one, say), and that any process loads without this module."""

    def __init__(self, estimator, seconds):
        self.estimator, self.seconds = estimator, seconds

    def __reduce__(self):
        return (operator.getitem, ((_Sleep(self.seconds), self.estimator), 1))


class FaultyLogisticRegression(LogisticRegression):
    """A LogisticRegression whose predict fails the way a bug in the serving stack would."""

    def predict(self, X):
        raise RuntimeError("internal detail: /srv/private/model.py, <class 'object'> at 0xdeadbeef")
