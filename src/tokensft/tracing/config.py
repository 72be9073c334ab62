"""Options of the per-token gradient tracer (`tokensft train --trace_*`).

Each option is declared once in `TRACE_OPTIONS` (`tokensft.options.Option`: type, default, range or choices, help)
and `TraceConfig` gets one field per declaration. It is mixed into the trainer's `TokenSFTConfig(SFTConfig,
TraceConfig)`, so every option is also a `--trace_*` command-line flag and a YAML key of a recipe. All fields start with `trace_` and have defaults; tracing
is off unless `trace_every_n_steps > 0`. See `docs/tracing.md` for what each quantity means and what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import Option, declare_fields, validate_fields

QUANTITIES = ("per_position", "per_token_loss")
ALIGNMENT_METHODS = ("jvp", "double_backward", "brute")
TOKEN_NORM_METHODS = ("exact", "projection", "brute")
SELECTIONS = ("random", "fixed")


TRACE_OPTIONS = (
    Option("trace_every_n_steps", int, 0, "Trace per-token gradients every N optimizer steps (0 = off).", low=0),
    Option("trace_at_start", bool, True, "Also trace before the first update (step 0)."),
    Option("trace_num_sequences", int, 1, "Sequences traced per trace step.", low=1),
    Option("trace_sequence_selection", str, "random", "random: a new seeded draw of sequences every trace step; "
           "fixed: the same draw every time.", choices=SELECTIONS),
    Option("trace_seed", int, 0, "Seed of the traced-sequence choice, the projections and the norm directions."),
    Option("trace_modules", str, None, "Regex searched in nn.Linear module names to trace (default: LoRA A/B modules "
           "of the active adapter with LoRA, else '(q_proj|v_proj)$').", nullable=True),
    Option("trace_proj_factor", int, 1, "Per-position projections: each side of dim d is projected to ceil(d/factor) "
           "dims with a Rademacher matrix seeded by the layer name (1 = identity: exact values).", low=1),
    Option("trace_proj_dim", int, 0, "Cap on the projected dims of each side (0 = no cap).", low=0),
    Option("trace_quantities", str, "per_position,per_token_loss", "Comma-separated subset of per_position (dy_t x "
           "x_t, the reference study's quantity) and per_token_loss (the gradient of token t's own loss)."),
    Option("trace_alignment_method", str, "jvp", "<grad l_t, G> for all tokens at once: jvp (one forward-mode JVP "
           "along G), double_backward, or brute (one backward per token).", choices=ALIGNMENT_METHODS),
    Option("trace_token_norms", str, "projection", "||grad l_t||: projection (default; random-JVP estimate with "
           "trace_norm_directions directions, relative std of the residual ||.||^2 <= sqrt(2/k), cost independent of "
           "the length), exact (one batched VJP per completion token: ~15x dearer per trace on 400 tokens) or brute.",
           choices=TOKEN_NORM_METHODS),
    Option("trace_norm_directions", int, 16, "k random directions of projection norms and of tokloss.grad_proj.",
           low=1),
    Option("trace_batch_size", int, 16, "Vector-Jacobian / Jacobian-vector products evaluated together.", low=1),
    Option("trace_max_length", int, 1024, "Cut traced sequences to their first N tokens.", low=2),
    Option("trace_store_projections", bool, False, "Also store raw per-position projections (pos.{l}.x_proj/dy_proj) "
           "and tokloss.grad_proj."),
)


@dataclass
@declare_fields(TRACE_OPTIONS)
class TraceConfig:
    """Per-token gradient tracing (the reference study's per-position traces + per-token-loss gradients).

    Parameters:
        trace_every_n_steps (`int`, defaults to 0): trace every N optimizer steps (0 = tracing off).
        trace_at_start (`bool`, defaults to True): also trace before the first update (step 0; a resumed run only when
            its step is a multiple of trace_every_n_steps).
        trace_num_sequences (`int`, defaults to 1): sequences traced per trace step.
        trace_sequence_selection (`str`, defaults to `"random"`): `random` draws new sequences each trace step with
            a generator seeded by (trace_seed, step); `fixed` traces the same seeded draw at every step.
        trace_seed (`int`, defaults to 0): seed of the sequence choice, the projections and the norm directions.
        trace_modules (`str`, *optional*): regex searched in the names of `nn.Linear` modules to trace. Default:
            the LoRA A/B Linear modules of the active adapter when the model has LoRA, else `(q_proj|v_proj)$`.
        trace_proj_factor (`int`, defaults to 1): per-position projections: each side (layer input x, output gradient
            dy) of dimension d is projected to ceil(d / factor) dims with a Rademacher matrix (1 = identity, exact).
        trace_proj_dim (`int`, defaults to 0): cap on the projected dims of each side (0 = no cap).
        trace_quantities (`str`, defaults to `"per_position,per_token_loss"`): comma-separated subset.
        trace_alignment_method (`str`, defaults to `"jvp"`): how <grad l_t, G> is computed for all t at once:
            `jvp` (one forward-mode JVP along G), `double_backward`, or `brute` (one backward per token; reference).
        trace_token_norms (`str`, defaults to `"projection"`): ||grad l_t||: `projection` (estimate from
            `trace_norm_directions` random JVPs, cost independent of the sequence length), `exact` (batched
            vector-Jacobian products, one per token, in chunks: ~0.36 training steps per completion token), or `brute`.
        trace_norm_directions (`int`, defaults to 16): k of `projection` norms and of `tokloss.grad_proj`.
        trace_batch_size (`int`, defaults to 16): VJPs / JVPs evaluated together (memory vs. speed).
        trace_max_length (`int`, defaults to 1024): traced sequences are cut to their first N tokens.
        trace_store_projections (`bool`, defaults to False): also store the raw per-position projections
            `pos.{l}.x_proj` / `pos.{l}.dy_proj` and the per-token gradient projection `tokloss.grad_proj`.
    """

    def trace_quantity_list(self) -> list[str]:
        """`trace_quantities` as a list, validated."""
        qs = [q.strip() for q in str(self.trace_quantities).split(",") if q.strip()]
        bad = [q for q in qs if q not in QUANTITIES]
        if bad or not qs:
            raise ValueError(f"--trace_quantities: unknown {bad or 'empty list'}; choose from {', '.join(QUANTITIES)}")
        return qs

    def validate_trace_config(self) -> None:
        """Check the `trace_*` values.

        Raises:
            ValueError: naming the offending `--trace_*` option.
        """
        validate_fields(self, TRACE_OPTIONS)  # every range and choice, from its declaration
        if self.trace_modules is not None:
            import re

            try:
                re.compile(self.trace_modules)
            except re.error as e:
                raise ValueError(f"--trace_modules {self.trace_modules!r} is not a valid regex: {e}") from None
        self.trace_quantity_list()
