"""MLtD: Meta-Learning the Difference (Hou, Salazar, Polovets, TACL 2022).

``mltd_tarp`` (§3.1): the inner loop adapts only the TARP factors Φ1, Φ2 (eq. 2-5, any TARP
kind); the outer loop meta-learns the base and the TARP initialisation on the summed query
losses (Algorithm 1). ``mltd`` (§3.2) adds TAMS: per task the controller picks a sublayer
architecture α from the support-set embedding (straight-through Gumbel-softmax), the inner
loop also adapts the selected op weights, and the outer loop updates the controller through α.
First-order by default, as in the released code; ``meta.second_order`` differentiates through
the inner loop.
"""

from __future__ import annotations

from metaprep.meta.algorithm import MetaAlgorithm, register
from metaprep.meta.inner import adapt_then_query


@register
class MLtDTARP(MetaAlgorithm):
    name = "mltd_tarp"
    episodic = True
    needs_tarp = True
    second_order = "optional"

    def meta_loss(self, model, support, query, step):
        return adapt_then_query(model, support, query, step, self.inner, self.tau, self.create_graph,
                                self.support_weight)


@register
class MLtD(MLtDTARP):
    name = "mltd"
    uses_tams = True
