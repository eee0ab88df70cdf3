"""beta-TCVAE total correlation of the stochastic bottleneck's latents, over the global sample."""

from __future__ import annotations

import torch

from tti_dist.capture.hookpoints import HookPointInfo
from tti_dist.config.regularizers import TotalCorrelationConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.collectives import gather_with_summed_grad, sum_with_identity_grad
from tti_dist.errors import ConfigError
from tti_dist.metrics.total_correlation import gaussian_log_density, log_importance_weights
from tti_dist.regularizers.base import Regularizer, register
from tti_dist.regularizers.kl import bottleneck_captures, check_bottleneck_hookpoints, sibling_names
from tti_dist.regularizers.token_sample import TokenSample


@register
class TotalCorrelation(TokenSample, Regularizer):
    """Total correlation of the bottleneck's aggregate posterior (beta-TCVAE), minibatch estimate.

    Source: Chen, Li, Grosse, Duvenaud (2018), "Isolating Sources of Disentanglement in
    Variational Autoencoders" (NeurIPS). TC(z) = KL(q(z) || prod_d q(z_d)) is the term of the
    ELBO's KL decomposition that penalizes statistically dependent latents; beta-TCVAE
    weights it by beta alone.

    With the sampled tokens of all DP ranks as the minibatch (M = dp_size x m tokens, m per
    rank), z_i the sampled latents (hookpoint blocks.{i}.bottleneck.z), q(z|x_j) =
    N(mu_j, diag exp(logvar_j)) (its mu and logvar siblings) and importance weights w_ij
    (`estimator`, `dataset_size`; tti_dist.metrics.total_correlation):

        TC_i = logsumexp_j (sum_d log q(z_id|x_j) + log w_ij)
               - sum_d logsumexp_j (log q(z_id|x_j) + log w_ij)

    loss on a rank = mean of TC_i over its own m rows i (columns j: all M tokens); mean over
    the hookpoints. Computed in fp32, autocast off.

    Reduce groups:
    - DP: mu and logvar of the sampled tokens are all-gathered over the DP group
      (gather_with_summed_grad: all-gather forward, reduce-scatter SUM backward);
      each rank keeps only its own rows' z.
    - TP: each rank evaluates log q(z_id|x_j) on its own D/tp latents; the sum over d (per
      pair i, j) and the sum over d of the per-latent logsumexps are completed with one
      sum_with_identity_grad (all-reduce forward, identity backward),
      correct because the loss is the same replicated scalar on every TP rank.

    Why DP=k gives exactly the DP=1 global-batch gradient: the DP=1 loss is
    L = (1/M) sum_i TC_i over all M rows; rank r's loss is L_r = (1/m) sum_{i in rows_r} TC_i,
    so sum_r L_r = dp_size x L. Rank r's backward sends d L_r / d(mu_j, logvar_j) for every
    column j back to the rank owning j (reduce-scatter SUM), so the tensors of rank r receive
    d(sum_s L_s)/d(its mu, logvar, z) = dp_size x dL/d(...), and its parameter gradients are
    dp_size x rank r's share of dL/dtheta. DeepSpeed sums over DP and divides by dp_size: the
    result is dL/dtheta. The value is the mean of the ranks' losses (the trainer's DP mean).
    All DP ranks must sample the same number m of tokens (equal micro-batches).

    Communication per hookpoint per micro-step (fp32 = 4 bytes, z = bottleneck_dim):
    DP all-gather of [m, 2 z/tp] (each rank receives 8 (dp-1) m z/tp bytes) and the same
    volume reduce-scattered in backward; TP all-reduce of m (M + 1) floats (4 m (M + 1)
    bytes), identity backward. Example m = 256, dp = 8 (M = 2048), z = 16, tp = 2: 115 kB
    DP each way, 2.1 MB TP.
    Cost: rows x M x z/tp Gaussian log-densities and logsumexps, ~10 m M z/tp FLOPs
    forward and ~2x that backward; memory a few [m, M, z/tp] fp32 tensors kept for
    backward (m = 256, M = 2048, z/tp = 8: 17 MB each). Use max_tokens to bound m.

    Metric: `tc_mss` or `tc_mws` (by estimator), the detached loss value.
    """

    Config = TotalCorrelationConfig

    def __init__(self, spec, model, groups) -> None:
        super().__init__(spec, model, groups)
        self._calls = 0

    @classmethod
    def check_params(cls, params: TotalCorrelationConfig, model_cfg: ModelConfig, hookpoints: list[str], where: str,
                     tp_size: int) -> None:
        if params.dataset_size is not None and params.dataset_size < 2:
            raise ConfigError(f"{where}.dataset_size: {params.dataset_size!r} must be an integer >= 2 or null "
                              "(the global sample size)")
        if params.max_tokens < 2:
            raise ConfigError(f"{where}.max_tokens: {params.max_tokens!r} must be an integer >= 2")
        if params.seed < 0:
            raise ConfigError(f"{where}.seed: {params.seed!r} must be an integer >= 0")
        check_bottleneck_hookpoints(cls.Config.type_name, model_cfg, hookpoints, where)

    @property
    def captures(self) -> list[HookPointInfo]:
        """The configured z hookpoints plus their mu and logvar."""
        return bottleneck_captures(self.model, self.hookpoints)

    def state_dict(self) -> dict:
        """The call counter keying the token sample (resume it to repeat an uninterrupted run)."""
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counter saved by `state_dict`."""
        self._calls = int(state["calls"])

    def _rows(self, hp: HookPointInfo, acts: dict[str, torch.Tensor], idx: torch.Tensor | None,
              log_w: torch.Tensor) -> torch.Tensor:
        """TC_i [m] for this rank's rows."""
        g = self.groups
        mu_name, lv_name = sibling_names(hp.name)
        z, mu, logvar = (acts[n].reshape(-1, acts[n].shape[-1]) for n in (hp.name, mu_name, lv_name))
        if idx is not None:
            z, mu, logvar = z.index_select(0, idx), mu.index_select(0, idx), logvar.index_select(0, idx)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, mu, logvar = z.float(), mu.float(), logvar.float()
            m, dim_local = z.shape
            if g.dp_size > 1:
                both = gather_with_summed_grad(torch.cat([mu, logvar], dim=-1), g.dp_group)
                mu, logvar = both[:, :dim_local], both[:, dim_local:]
            num_cols = mu.shape[0]
            log_q = gaussian_log_density(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # [m, M, D/tp]
            joint_local = log_q.sum(-1)  # [m, M]
            marginals_local = torch.logsumexp(log_q + log_w.unsqueeze(-1), dim=1).sum(-1)  # [m]
            packed = torch.cat([joint_local.reshape(-1), marginals_local])
            if hp.tp_sharded and g.tp_size > 1:
                packed = sum_with_identity_grad(packed, g.tp_group)
            joint = packed[: m * num_cols].view(m, num_cols)
            marginals = packed[m * num_cols:]
            return torch.logsumexp(joint + log_w, dim=1) - marginals

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.groups
        call, self._calls = self._calls, self._calls + 1
        first = acts[self.hookpoints[0].name]
        num_tokens = first.numel() // first.shape[-1]
        idx = self.token_index(num_tokens, call, first.device)
        m = num_tokens if idx is None else idx.numel()
        num_samples = m * g.dp_size
        if num_samples < 2:
            raise ValueError(f"{self.spec.where}: total correlation needs at least 2 sampled tokens, got {num_samples}")
        dataset_size = self.params.dataset_size if self.params.dataset_size is not None else num_samples
        log_w = log_importance_weights(num_samples, dataset_size, self.params.estimator, row_offset=g.dp_rank * m,
                                       num_rows=m, device=first.device)
        total = None
        for hp in self.hookpoints:
            tc = self._rows(hp, acts, idx, log_w).mean()
            total = tc if total is None else total + tc
        value = total / len(self.hookpoints)
        return value, {f"tc_{self.params.estimator}": value.detach()}
