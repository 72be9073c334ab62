"""A token-weighting scheme of your own, usable from the CLI without editing tokensft.

    tokensft train --scheme_files examples/schemes/median_floor.py --mode median-floor \
        --scheme_args floor_weight=0.5 --stat_scope global ...

Tokens whose loss is above the median loss of their scope (`--stat_scope`: micro_batch, sequence, or the whole
optimizer step with `global`) get `floor_weight`, the others 1. The declaration below is all tokensft needs: the
parameter's default, range and help (validated before the model loads), that the scheme takes a statistic of the
token losses over a scope (so `stat_scope=global` runs the trainer's extra pass), and its description; the tracer
then records `weight.median-floor` and the visualizer lists it.
"""

import torch

from tokensft.losses import SchemeParam, register_scheme, token_losses

FLOOR_WEIGHT = SchemeParam("floor_weight", float, 0.25, "weight of tokens above the median loss.", low=0.0, high=1.0)


def median_floor(ctx):
    """w_t = 1 if l_t <= median of l in scope else floor_weight; `ctx` holds (B, T) float32 log_probs and mask."""
    median = ctx.scope_statistic(torch.median)  # (B, T): the lower median of the token losses in each token's scope
    return torch.where(ctx.losses <= median, torch.ones_like(ctx.losses), torch.full_like(ctx.losses, ctx.floor_weight))


register_scheme("median-floor", median_floor, params=(FLOOR_WEIGHT,), scope=token_losses,
                description="loss above the scope's median -> floor_weight", source="an example of a user scheme",
                affects="below_one", affects_label="median-floor floors", overwrite=True)
