"""``drift.function``: how alike are layers in what they compute, measured on activations?

Weight-space drift (:mod:`drift.analysis`) asks how far apart two layers' parameters are once
the gauge is removed. This module asks the functional question directly: run the checkpoint
through ``transformers`` on real text and compare, for every pair (i, j) of a block of layers,

``residual_angle``  the angular distance between the residual stream after layer i and after
                    layer j at the same token (Gromov et al. 2024, "The Unreasonable
                    Ineffectiveness of the Deeper Layers", arXiv:2403.17887)::

                        d(i, j) = mean over tokens t of  arccos(cos(h_{i+1,t}, h_{j+1,t})) / π

                    a *distance* in [0, 1]: 0 = same direction, 0.5 = orthogonal.

``update_cka``      linear CKA (Kornblith et al. 2019, "Similarity of Neural Network
                    Representations Revisited", ICML) between the two layers' updates
                    Δ_l = h_{l+1} − h_l over tokens::

                        CKA(X, Y) = ‖Yᶜᵀ Xᶜ‖_F² / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F),   X = Δ_i, Y = Δ_j  (N, d)

                    (ᶜ: columns centred over tokens) a *similarity* in [0, 1]: 1 = equal up
                    to a rotation and a scale, 0 = uncorrelated.

Here h_l is the input of layer l and h_{l+1} its output, read with forward hooks on the layer
modules the architecture registry names. That is HF's ``output_hidden_states[l + 1]`` for every
layer but the last of a model with a final norm (Llama, GPT-2, ...), for which HF returns the
*normed* state; drift keeps the raw residual stream there too.

Both numbers are functions of the model's computation alone, so they are unchanged by any
exact gauge transform of the weights (the tests plant one). Memory is bounded: a batch's hidden
states are reduced into running sums (token counts and angle sums per pair; per layer a
d-vector and per pair a d × d cross-covariance, float64) and dropped, so memory is
O(pairs · d²) whatever the number of tokens. What is *not* done: no null baseline (``null`` and
``rho`` are NaN), no kernel CKA, no per-position breakdown.

The shared-operator test, :func:`tie` (module ``tie``), runs the model too: a family of one
layer carried into another layer's coordinates by a method's fitted alignment and put in its
place, the outputs' change measured on the same text.

Modules: ``measures`` (the two measures as running sums), ``text`` (what the model reads),
``run`` (:func:`activation_similarity`: the model, the hooks, the result), ``tie``, ``cli``
(``drift function``, ``drift tie``). ``import drift.function`` does not import ``transformers``.
"""

from .measures import CrossCovariances, angular_distance
from .run import BATCH_SIZE, N_SEQ, SEQ_LEN, activation_similarity
from .text import default_text, random_tokens, token_sequences
from .tie import tie

__all__ = ["BATCH_SIZE", "N_SEQ", "SEQ_LEN", "CrossCovariances", "activation_similarity", "angular_distance",
           "default_text", "random_tokens", "tie", "token_sequences"]
