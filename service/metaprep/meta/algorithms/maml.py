"""MAML with true second-order meta-gradients (Finn, Abbeel, Levine, ICML 2017).

Meta-objective (eq. 1 of the paper, with fast weights φ instead of all parameters):
    min_θ Σ_t L_query_t( φ_t ),   φ_t = U^{T_in}(θ; support_t)
where U is ``meta.inner_steps`` SGD/Adam steps from the meta-init. The inner updates are built
with ``create_graph=True`` so ∂φ_t/∂θ includes the Hessian-vector terms. θ covers the fast-weight
init and, unless ``meta.freeze_base``, the base weights (they enter every inner forward).
"""

from __future__ import annotations

from metaprep.meta.algorithm import MetaAlgorithm, register
from metaprep.meta.inner import adapt_then_query


@register
class MAML(MetaAlgorithm):
    name = "maml"
    episodic = True
    second_order = "always"

    def meta_loss(self, model, support, query, step):
        return adapt_then_query(model, support, query, step, self.inner, self.tau, create_graph=True,
                                support_weight=self.support_weight)
