"""Base directions: what CBLR scales by a rate per layer, one base per module (momentum SGD, Adam).

A base forms the direction :math:`u_l = k_l d_l` of every layer from its gradient (:meth:`BaseDirection.direction`,
which returns a :class:`~hf_cblr.optim.types.Direction`) and applies the update :math:`w \\leftarrow w - \\eta\\, r_l\\,
u_l` once the rates :math:`r_l` are known (:meth:`BaseDirection.update`). Add a base with one file: subclass
:class:`BaseDirection` and decorate it with :func:`register_direction`.
"""

from hf_cblr.optim.directions.base import DIRECTIONS, BaseDirection, create_direction, register_direction

# isort: off
from hf_cblr.optim.directions.sgd import MomentumSGD  # the paper's base registers first
from hf_cblr.optim.directions.adam import Adam, AdamDirection
# isort: on

__all__ = ["DIRECTIONS", "Adam", "AdamDirection", "BaseDirection", "MomentumSGD", "create_direction", "register_direction"]
