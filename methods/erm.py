"""Empirical risk minimisation."""

from robustbench_mat.method import Method
from robustbench_mat.registry import register_method


@register_method("erm")
class ERM(Method):
    """Empirical risk minimisation: the mean cross-entropy of one network (the reference row).

    Everything ERM does is the default behaviour of `Method`: uniform minibatches, mean
    cross-entropy, and the loop's search space (learning rate, weight decay, batch size).
    """

    paper = "Vapnik 1992, Principles of Risk Minimization for Learning Theory"
