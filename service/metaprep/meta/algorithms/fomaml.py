"""First-order MAML (Finn et al. 2017, §5.2; Nichol et al. 2018).

Same objective as :mod:`metaprep.meta.algorithms.maml` but the inner-loop gradients are treated as
constants (no ``create_graph``): ∂φ_t/∂θ ≈ I, so the meta-gradient is the query gradient at the
adapted weights. Cheaper by the Hessian-vector products; the default of the released MLtD code.
"""

from __future__ import annotations

from metaprep.meta.algorithm import MetaAlgorithm, register
from metaprep.meta.inner import adapt_then_query


@register
class FOMAML(MetaAlgorithm):
    name = "fomaml"
    episodic = True

    def meta_loss(self, model, support, query, step):
        return adapt_then_query(model, support, query, step, self.inner, self.tau, create_graph=False,
                                support_weight=self.support_weight)
