"""The predictors: the interface's built-ins and the trajectory predictors.

``last_update`` and ``extrapolate`` repeat a direction of the basis; ``rssm`` is the
learned ensemble; ``linefit`` and ``snoo`` extrapolate the trajectory seen through
displacements over ``BasisSettings.stride`` real steps. Each factory returns an
``hj.Predictor`` to pass to ``hj.predictive(..., predictor=...)``; the ones with default
arguments can also be named by ``HybridConfig(predictor=...)``.
"""

from ._predictors import extrapolate, last_update
from ._rssm import rssm
from ._trajectory import line_weights, linefit, snoo

__all__ = ["extrapolate", "last_update", "line_weights", "linefit", "rssm", "snoo"]
