r"""QK-clip: bound every attention head's largest pre-softmax logit by rescaling its W_q and W_k rows.

The rule of MuonClip ("Kimi K2: Open Agentic Intelligence", Algorithm 1). For attention head
:math:`h` let

.. math::
   S^h_{\max} = \max_{\text{batch}}\ \max_{i,j}\ \text{scale}\cdot q^h_i\cdot k^h_j

be the largest logit the head produced in the step (over the allowed positions: a causal or boolean
mask removes the masked ones), and :math:`\gamma_h = \min(1, \tau/S^h_{\max})`. After the optimizer
update, every head with :math:`S^h_{\max} > \tau` has its query rows and its key rows multiplied by
:math:`\sqrt{\gamma_h}`. Since :math:`q^h_i\cdot k^h_j` is bilinear in the two row blocks (biases
scaled with their rows), every logit of that head is multiplied by exactly :math:`\gamma_h`, so the
logit that was :math:`S^h_{\max}` becomes :math:`\tau`. Heads at or below :math:`\tau` are multiplied
by exactly 1 (left bit-identical). Nothing changes in the forward or backward pass.

**Grouped-query attention.** A key head shared by the query heads of its group :math:`g` is scaled by
:math:`f_k = \sqrt{\gamma_g}` with :math:`\gamma_g = \min_{h\in g}\gamma_h` (the largest logit of the
group). Each query head gets :math:`f_q^h = \min(1, \gamma_h / f_k)`, so head :math:`h`'s logits are
multiplied by :math:`f_q^h f_k = \max(\gamma_h, \ldots)\le 1`: exactly :math:`\gamma_h` when
:math:`\gamma_h \le \sqrt{\gamma_g}` (the worst head of the group always), and :math:`\sqrt{\gamma_g}`
for a head that needed less; no row is ever scaled up and every head ends at or below :math:`\tau`.
With one query head per key head this is the :math:`\sqrt{\gamma_h}` rule above.

**Multi-head latent attention** (:meth:`QKClip.mla`, DeepSeek-V3 layout). Each head's query is
:math:`[q^C; q^R]` (content and rotary parts, rows of the query up-projection) and its key is
:math:`[k^C; k^R]`, where :math:`k^C` comes from the head's rows of the key/value up-projection and the
rotary key :math:`k^R` is *shared by all heads*. As in Kimi K2, :math:`q^C` and :math:`k^C` rows are
multiplied by :math:`\sqrt{\gamma_h}`, the rotary query rows :math:`q^R` by :math:`\gamma_h`, and the
shared :math:`k^R` projection and the value rows are not touched, so clipping one head never changes
another head's logits.

**Where the maxima come from.** (a) :meth:`QKClip.observe` called inside the attention with ``q`` and
``k`` (chunked over query positions: memory :math:`O(B\cdot H\cdot c\cdot T)` for a chunk of :math:`c`
rows); (b) forward hooks installed by :meth:`QKClip.attention` (``hooks=True``) that intercept every
``torch.nn.functional.scaled_dot_product_attention`` call inside the module's forward and pass its
``q``, ``k``, ``scale``, ``is_causal``, ``attn_mask`` and ``enable_gqa`` to :meth:`observe`; (c)
:meth:`QKClip.update_max_logits` with per-head maxima the user already has (e.g. returned by an
attention kernel). All three keep a running maximum on the device without a host sync.

**Timing.** :meth:`QKClip.apply` uses the maxima observed since the last call, i.e. the logits of this
step's forward pass (at the weights before the update), exactly as Kimi K2 does: the bound then holds
for the next step up to the growth a single update causes. ``apply(recompute=fn)`` instead runs ``fn``
(a forward pass, under ``no_grad``) after the update and clips with the logits of the updated weights,
which bounds them by :math:`\tau` exactly on that batch, at the cost of one forward.

**Sharded weights.** Every factor belongs to one output row, so the rescale is local to each shard of
a ``DTensor`` weight: for ``Shard(d)`` on the output axis (FSDP2's ``Shard(0)``, tensor parallel's
column-wise ``Shard(0)``) each rank multiplies its own rows by the matching slice of the factor vector;
for ``Shard`` on the input axis (row-wise TP) and ``Replicate`` every rank multiplies its whole local
block; a ``Partial`` weight's partial sums are scaled alike (the rescale is linear). No communication is
needed except one ``all_reduce(MAX)`` of all per-head maxima per :meth:`apply` when
``torch.distributed`` is initialized (data-parallel ranks see different batches and must clip
identically; tensor-parallel ranks that observe only their own heads leave the others at
:math:`-\infty`). Every rank of ``process_group`` must declare the same attention modules in the same
order (pipeline stages that own different layers pass their stage's group, or ``process_group=False``
and reduce the maxima themselves).
"""
from __future__ import annotations

from .clip import QKClip
from .observe import observe_max_logits
from .rescale import clip_factors

__all__ = ["QKClip", "observe_max_logits", "clip_factors"]
