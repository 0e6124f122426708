"""Planted bugs keep the suite honest: each entry below is a one-line bug in src/ that the fast
tests it names must catch. Every case copies src/, plants its bug, and runs those tests on
the copy (tests/mutations.py); the case passes only if one of them fails, by an assertion or
an error inside a test (pytest's exit status 1). A bug that no named test notices, a test
id that no longer exists, a collection error and a text to replace that is not in the code
exactly once all fail the case, so this list moves with the code. How to add one when adding
a feature: tests/README.md.

The named tests also run unmutated in the rest of the suite, so a case cannot pass merely
because a test was already broken; `test_the_harness_runs_the_copy_and_passes_unmutated`
checks the machinery itself on an unchanged copy."""

from __future__ import annotations

import pytest

from .mutations import Mutation, Server, StaleMutation, planted_copy

M = Mutation
ZOO = "tests/moe/test_router_zoo.py"
LOSSES = "tests/moe/test_losses.py"
SMEAR = "tests/moe/test_smear.py"
GATHER = "tests/moe/test_gather_path.py::test_gather_path_equals_scatter_path"
VISION_VIEWS = "tests/callbacks/test_specialisation.py::test_vision_tables_count_each_class_and_patch_position_per_expert"
EVERY_ROUTER_ALARM = "tests/callbacks/test_collapse.py::test_alarm_reads_the_plan_of_every_router_kind"
EVERY_ROUTER_STATISTICS = "tests/callbacks/test_utilisation.py::test_statistics_exist_for_every_router_kind"
DISTILL = "tests/tasks/test_distill.py"

MUTATIONS = [
    # ---- every router's selection and weights (moe/routers/) ------------------------------
    M("moelab/moe/routers/base.py",
      "    with torch.autocast(x_TD.device.type, enabled=False):\n        return F.linear(x_TD.float(), weight_ED.float())",
      "    return F.linear(x_TD, weight_ED).float()",
      ("tests/moe/test_routers.py::test_router_logits_are_fp32_under_bf16_autocast",
       "tests/moe/test_bf16.py::test_router_math_stays_fp32_and_experts_get_bf16"),
      "router_logits_bf16: a bf16 matmul under autocast, cast back to fp32"),
    M("moelab/moe/routers/token_choice.py",
      "selected_TK = selection_TE.topk(self.k, dim=-1).indices",
      "selected_TK = selection_TE.topk(self.k, dim=-1, largest=False).indices",
      ("tests/moe/test_routers.py::test_topk_weights_match_equation",),
      "topk_selection: token-choice routers pick their k lowest scores"),
    M("moelab/moe/routers/token_choice.py",
      "weights_TK = raw_TK / raw_TK.sum(dim=-1, keepdim=True) if self.normalize else raw_TK",
      "weights_TK = raw_TK",
      ("tests/moe/test_routers.py::test_topk_weights_match_equation",),
      "topk_weights: router.normalize=true does not renormalise over the chosen experts"),
    M("moelab/moe/dispatch.py",
      "return min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts))",
      "return min(num_tokens, math.floor(capacity_factor * top_k * num_tokens / num_experts))",
      ("tests/moe/test_dispatch.py::test_expert_capacity_formula",
       "tests/moe/test_dispatch.py::test_capacity_drops_exactly_the_overflow"),
      "switch_capacity: C = floor(cf·k·T/E) instead of the ceiling"),
    M("moelab/moe/routers/token_choice.py",
      "2 * second_weight_T > uniform_T], 1)",
      "second_weight_T > uniform_T], 1)",
      (f"{ZOO}::test_gshard_second_expert_kept_with_probability_2g2",),
      "gshard_second_expert: kept with probability g2, not 2·g2"),
    M("moelab/moe/routers/token_choice.py",
      "threshold_TE = torch.where(noisy_TE >= kth_T1, kplus1_T1, kth_T1)",
      "threshold_TE = torch.where(noisy_TE >= kth_T1, kth_T1, kplus1_T1)",
      (f"{ZOO}::test_noisy_topk_weights_and_load_estimator",),
      "noisy_topk_load: the load estimator's kth_excluding swapped"),
    M("moelab/moe/routers/token_choice.py",
      "return self.plan(clean_TE, probs_TE, noisy_TE, probs_TE, context, load_estimate_E=load_TE.sum(0),",
      "return self.plan(clean_TE, probs_TE, clean_TE, probs_TE, context, load_estimate_E=load_TE.sum(0),",
      (f"{ZOO}::test_noisy_topk_weights_and_load_estimator",),
      "noisy_topk_selection: the top-k of the clean logits in training, not of the noisy ones"),
    M("moelab/moe/routers/token_choice.py",
      "self.masked(router_logits(projected_TR, experts_ER) / self.temperature, context)",
      "self.masked(router_logits(projected_TR, experts_ER), context)",
      (f"{ZOO}::test_cosine_router_scores",),
      "cosine_temperature: the cosine router's scores not divided by the temperature"),
    M("moelab/moe/routers/balanced.py",
      "selection_TE = scores_TE.detach() + self.expert_bias_E",
      "selection_TE = scores_TE.detach()",
      (f"{ZOO}::test_aux_free_selection_uses_bias_but_weights_do_not",),
      "aux_free_selection: the bias plays no part in the selection"),
    M("moelab/moe/routers/balanced.py",
      "            selection_TE = self.sinkhorn(logits_TE, self.max_iterations, self.tolerance)",
      "            selection_TE = probs_TE",
      (f"{ZOO}::test_sinkhorn_balances_in_training_and_is_topk_at_eval",),
      "sinkhorn_training: training selects by plain top-k, unbalanced"),
    M("moelab/moe/routers/hash.py",
      "selected_T1 = self.expert_of_key[keys_T % self.num_keys].unsqueeze(1)",
      "selected_T1 = self.expert_of_key[(keys_T + 1) % self.num_keys].unsqueeze(1)",
      (f"{ZOO}::test_hash_router_is_a_fixed_balanced_map",),
      "hash_lookup: each token takes the next key's expert"),
    M("moelab/moe/routers/dense.py",
      "return token_choice_routing(logits_TE, probs_TE, every_TE, probs_TE, context=context)",
      "return token_choice_routing(logits_TE, probs_TE, every_TE, torch.full_like(probs_TE, 1 / self.num_experts), "
      "context=context)",
      (f"{ZOO}::test_dense_gating_uses_every_expert_with_softmax_weights",),
      "dense_weights: even weights instead of the softmax"),
    M("moelab/moe/routers/expert_choice.py",
      "combine_weight_N=gates_CE.t().reshape(-1),",
      "combine_weight_N=torch.ones_like(gates_CE).t().reshape(-1),",
      (f"{ZOO}::test_expert_choice_takes_top_c_tokens_per_expert",),
      "expert_choice_weights: every taken token weighted 1, not by its probability"),
    M("moelab/moe/routers/soft.py",
      "dispatch_BMS=logits_BMS.softmax(dim=1),",
      "dispatch_BMS=logits_BMS.softmax(dim=2),",
      (f"{ZOO}::test_soft_moe_matches_per_sequence_loops_and_normalises",),
      "soft_dispatch: dispatch weights a softmax over slots, not over tokens"),
    M("moelab/moe/routers/soft.py",
      "logits_BE = router_logits(x_BLD.float().mean(1), self.gate.weight)",
      "logits_BE = router_logits(x_BLD.float()[:, 0], self.gate.weight)",
      (f"{SMEAR}::test_the_layer_is_the_ffn_of_merged_parameters_and_its_gradients_match",),
      "smear_routing: a sequence routed by its first token, not its mean"),
    M("moelab/moe/routing.py",
      "return self.router_probs_TE.detach().sum(0)",
      "return torch.full((self.num_experts,), self.num_tokens / self.num_experts, device=self.router_probs_TE.device)",
      (f"{SMEAR}::test_the_layer_is_the_ffn_of_merged_parameters_and_its_gradients_match", EVERY_ROUTER_STATISTICS,
       EVERY_ROUTER_ALARM),
      "smear_tokens_per_expert: a uniform T/E, so the dead-expert alarm cannot fire"),
    # ---- every auxiliary loss (moe/losses.py) ------------------------------------------------
    M("moelab/moe/losses.py",
      "return plan.num_experts * torch.dot(fraction_E, plan.router_probs_TE.mean(dim=0))",
      "return torch.dot(fraction_E, plan.router_probs_TE.mean(dim=0))",
      (f"{LOSSES}::test_balance_matches_loop_definition_on_random_routing",),
      "balance_loss: the factor E dropped (1/E at uniform routing)"),
    M("moelab/moe/losses.py",
      "fraction_BE = counts_BE / selected_BLK[0].numel()",
      "fraction_BE = counts_BE / selected_BLK.numel()",
      (f"{LOSSES}::test_seq_balance_averages_per_sequence_balance",),
      "seq_balance_loss: f over the whole batch's assignments, not the sequence's"),
    M("moelab/moe/losses.py",
      "return torch.logsumexp(plan.router_logits_TE, dim=-1).square().mean()",
      "return torch.logsumexp(plan.router_logits_TE, dim=-1).mean().square()",
      (f"{LOSSES}::test_z_loss_matches_formula",),
      "z_loss: the square of the mean, not the mean of the squares"),
    M("moelab/moe/losses.py",
      "importance_E.scatter_add(0, plan.selected_experts_TK.reshape(-1), plan.gates_TK.reshape(-1))",
      "importance_E.scatter_add(0, plan.selected_experts_TK.reshape(-1), torch.ones_like(plan.gates_TK).reshape(-1))",
      (f"{LOSSES}::test_importance_is_cv_squared_of_gate_sums",),
      "importance_loss: counts of choices instead of sums of gates"),
    M("moelab/moe/losses.py",
      "return values_E.var(unbiased=False) / values_E.mean().square().clamp_min(1e-10)",
      "return values_E.var(unbiased=True) / values_E.mean().square().clamp_min(1e-10)",
      (f"{LOSSES}::test_load_loss_is_cv_squared_of_the_estimate",),
      "load_loss: CV² with the sample variance, not the population one"),
    M("moelab/moe/routing.py",
      "return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()",
      "return -(probs_TE * probs_TE.clamp_min(1e-20).log()).mean()",
      (f"{LOSSES}::test_entropy_loss",),
      "entropy_loss: averaged over experts as well as tokens"),
    M("moelab/moe/losses.py",
      "weights[name] = float(weight)",
      "weights[name] = abs(float(weight))",
      ("tests/run/test_train.py::test_a_negative_entropy_weight_is_allowed_since_its_sign_picks_the_direction",),
      "loss_weight_sign: a negative entropy weight loses its sign"),
    # ---- dispatch and combine, both paths (moe/routing.py, moe/dispatch.py) -----------------
    M("moelab/moe/routing.py",
      "weighted_ND = y_ND.float() * self.combine_weight_N.unsqueeze(-1).float()",
      "weighted_ND = y_ND * self.combine_weight_N.unsqueeze(-1).to(y_ND.dtype)",
      (f"{ZOO}::test_combine_accumulates_in_fp32",),
      "combine_index_add_bf16: the generic combine multiplies and accumulates in bf16"),
    M("moelab/moe/routing.py",
      "return (y_TKD * weight_TK.to(y_ND.dtype).unsqueeze(-1)).sum(1)",
      "return y_TKD.sum(1)",
      (GATHER,),
      "combine_gather_unweighted: the gather path sums a token's rows without their weights"),
    M("moelab/moe/routing.py",
      "return grad_RJD.sum(1) if choices > 1 else grad_RJD.squeeze(1), None, None, None",
      "return grad_RJD[:, 0], None, None, None",
      (GATHER,),
      "dispatch_gather_backward: a token's gradient from its first choice's row only"),
    M("moelab/moe/dispatch.py",
      "keep_A = (rank_A < capacity) & (sorted_queue_A < num_experts)",
      "keep_A = (rank_A <= capacity) & (sorted_queue_A < num_experts)",
      ("tests/moe/test_dispatch.py::test_capacity_drops_exactly_the_overflow",),
      "dispatch_capacity: one assignment more than the capacity kept per expert"),
    # ---- the expert views' counts and the collapse alarm (callbacks/) -------------------------
    M("moelab/callbacks/specialisation.py",
      "labels_T = labels.to(share_TE.device).repeat_interleave(per_item)",
      "labels_T = labels.to(share_TE.device).repeat(per_item)",
      (VISION_VIEWS,),
      "specialisation_labels: class labels cycled over the batch, not spread per image"),
    M("moelab/callbacks/specialisation.py",
      "self._counts[key] = table.index_add_(0, rows_T, share_TE)",
      "self._counts[key] = table.index_add_(0, rows_T, share_TE.flip(1))",
      (VISION_VIEWS,),
      "specialisation_experts_reversed: the tables' expert columns in reverse order"),
    M("moelab/callbacks/collapse.py",
      "dead_E = streak_E >= self.patience",
      "dead_E = streak_E > self.patience",
      (EVERY_ROUTER_ALARM,),
      "collapse_patience: dead after patience + 1 low steps"),
    # ---- resume state: sampler position, random streams (data/, callbacks/checkpoint.py) ------
    M("moelab/data/sampling.py",
      "sampler.resume(epoch, batches_done * batch_size)",
      "sampler.resume(epoch, batches_done)",
      ("tests/data/test_sampling.py::test_a_restored_position_starts_the_training_loader_at_the_next_batch",),
      "resume_sampler_position: skips batches_done items, not batches"),
    M("moelab/callbacks/checkpoint.py",
      'np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))',
      'np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), 0, has_gauss, cached_gauss))',
      ("tests/callbacks/test_checkpoint.py::test_random_streams_round_trip",),
      "resume_rng: NumPy's stream restored at the start of its key block, not at its position"),
    # ---- a failed run's loader workers (run/train.py, data/sampling.py) ------------------------
    M("moelab/run/train.py",
      "        end_loader_workers()  # the fit's loaders are done with: their workers would outlive it\n",
      "",
      ("tests/data/test_images.py::test_an_unreadable_image_is_named_in_one_line_from_any_loader_process",),
      "failed_run_workers: a failed run leaves its loader workers waiting, and the process hangs at exit"),
    # ---- the divergence guard (tasks/divergence.py) ------------------------------------------
    M("moelab/tasks/divergence.py",
      "first = (self.first_bad_t < 0) & ~torch.isfinite(grad_norm)",
      "first = ~torch.isfinite(grad_norm)",
      ("tests/tasks/test_divergence.py",),
      "divergence_first_step: names the latest non-finite step, not the first"),
    M("moelab/tasks/divergence.py",
      "return (self.first_bad_t >= 0).float()",
      "return (~torch.isfinite(grad_norm)).float()",
      ("tests/tasks/test_divergence.py",),
      "divergence_not_sticky: steps after a non-finite one are applied again"),
    # ---- distillation, both tasks (tasks/) ----------------------------------------------------
    M("moelab/tasks/vision.py",
      "loss = self.add_aux_losses(self.with_teacher(ce, logits, images))",
      "loss = self.add_aux_losses(ce)",
      (f"{DISTILL}::test_the_vision_training_loss_mixes_ce_and_kl_to_the_frozen_teacher",),
      "distill_vision: the vision task trains without its teacher"),
    M("moelab/tasks/language.py",
      "loss = self.add_aux_losses(self.with_teacher(ce, logits, inputs))",
      "loss = self.add_aux_losses(ce)",
      (f"{DISTILL}::test_the_language_training_loss_mixes_ce_and_kl_to_the_frozen_teacher",),
      "distill_language: the language task trains without its teacher"),
    M("moelab/tasks/base.py",
      "return (1 - self.distill_weight) * ce + self.distill_weight * kl",
      "return self.distill_weight * ce + (1 - self.distill_weight) * kl",
      (f"{DISTILL}::test_the_language_training_loss_mixes_ce_and_kl_to_the_frozen_teacher",),
      "distill_mix: w weighs the CE and 1 − w the KL"),
    # ---- upcycling and merging (moe/lifecycle/) -----------------------------------------------
    M("moelab/moe/lifecycle/upcycle.py",
      "out_scale = 1.0 / (1 + s) if slices == 1 else E / holders[j]",
      "out_scale = 1.0 if slices == 1 else E / holders[j]",
      ("tests/moe/test_upcycle.py::test_upcycled_lm_computes_the_dense_lm",),
      "upcycle_shared_scale: routed copies beside a shared one not scaled by 1/(1+s)"),
    M("moelab/moe/lifecycle/merge.py",
      "out.append(w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(members)))",
      "out.append(torch.full_like(w, 1.0 / len(members)))",
      ("tests/moe/test_merge.py::test_merged_stacks_and_router_rows_are_the_weighted_means",),
      "merge_weights: members averaged evenly, not weighted by usage"),
    # ---- MaskMoE (routers, the language task, the text data) --------------------------------
    M("moelab/moe/routers/token_choice.py",
      "torch.argsort(frequency_V[seen], stable=True)[: round(self.rare_share * seen.numel())]",
      "torch.argsort(frequency_V[seen], descending=True, stable=True)[: round(self.rare_share * seen.numel())]",
      ("tests/moe/test_maskmoe.py::test_the_rarest_half_of_seen_ids_and_the_unseen_get_one_expert_balanced_and_the_rest_all",),
      "maskmoe_rarest: the most frequent half of the ids get one expert"),
    M("moelab/tasks/language.py",
      'counts = torch.from_numpy(token_counts("train"))',
      'counts = torch.from_numpy(token_counts("val"))',
      ("tests/moe/test_maskmoe.py::test_the_language_task_fits_the_mask_from_the_training_split",),
      "maskmoe_split: the mask fitted on the validation split"),
    M("moelab/data/text.py",
      "tokens, chunk = self.tokens[split], 1 << 24",
      'tokens, chunk = self.tokens["val"], 1 << 24',
      ("tests/data/test_text.py::test_token_counts_count_each_splits_own_bytes",),
      "token_counts_split: every split's counts read from the validation split"),
    M("moelab/data/token_files.py",
      "        if tmp.exists() and done_file.exists():\n",
      "        if False:\n",
      ("tests/data/test_hf_text.py::test_an_interrupted_preparation_resumes_to_the_same_files",),
      "token_files_resume: an interrupted preparation starts over"),
    # ---- the report's statistics (sweeps/statistics.py) --------------------------------------
    M("moelab/sweeps/statistics.py",
      "df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))",
      "df = len(a) + len(b) - 2",
      ("tests/sweeps/test_statistics.py::test_welch_matches_scipys_unequal_variance_t_test",),
      "welch_df: the pooled degrees of freedom, not Welch-Satterthwaite's"),
    M("moelab/sweeps/statistics.py",
      "running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))",
      "running = max(running, min(1.0, len(p_values) * p_values[index]))",
      ("tests/sweeps/test_statistics.py::test_holm_adjusts_by_rank_keeps_order_and_stays_monotone",),
      "holm: Bonferroni's factor m for every rank"),
    # ---- the export's weight mapping (use/export_hf.py) --------------------------------------
    M("moelab/use/export_hf.py",
      "torch.cat([experts.w1_EDF, experts.w3_EDF], dim=2).transpose(1, 2)",
      "torch.cat([experts.w3_EDF, experts.w1_EDF], dim=2).transpose(1, 2)",
      ("tests/use/test_export_hf.py::test_transformers_loads_the_export_with_moelabs_logits",),
      "export_gate_up: the experts' gate and up projections swapped"),
    # ---- the config allow-list of stored checkpoints (models/targets.py) ----------------------
    M("moelab/models/targets.py",
      "elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):",
      "elif isinstance(node, tuple):",
      ("tests/use/test_untrusted_checkpoints.py::test_foreign_targets_are_found_at_every_depth_and_trusted_ones_pass",),
      "targets_lists: `_target_`s inside lists (`_args_`) go unchecked"),
]

TIMEOUT_S = 120  # one case; the named tests take seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mutation_server") / "server.log")
    yield server
    server.close()


def _log_tail(log, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no output)"
    return "\n".join(text.splitlines()[-lines:])


def run_planted(server, mutation, tests, tmp_path) -> tuple[int, str]:
    """(pytest's exit status, the end of its output) for `tests` on a copy of src/ with
    `mutation` planted (None: an unchanged copy)."""
    try:
        src = planted_copy(mutation, tmp_path / "tree")
    except StaleMutation as exc:
        pytest.fail(f"stale mutation ({mutation.why}): {exc}; update it to the code as it is now")
    log = tmp_path / "pytest.log"
    rc = server.run(src, tests, log, tmp_path / "basetemp", TIMEOUT_S)
    return rc, _log_tail(log)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_the_named_tests_catch_the_planted_bug(server, mutation, tmp_path):
    """The bug planted in a copy of src/, the named tests fail on it (pytest -x: the first
    failure ends the run); their output is in this case's tmp_path, pytest.log."""
    rc, tail = run_planted(server, mutation, mutation.tests, tmp_path)
    assert rc != 0, f"the bug went unnoticed: {mutation.why}\nin src/{mutation.file}; {', '.join(mutation.tests)} passed"
    assert rc == 1, f"pytest exited {rc}, not with a test failure (a collection or usage error, a timeout):\n{tail}"


def test_a_mutation_whose_text_is_gone_is_stale(tmp_path):
    gone = Mutation("moelab/moe/losses.py", "no such line", "x", (), "gone: a refactor moved the line")
    with pytest.raises(StaleMutation, match="holds the text to replace 0 times"):
        planted_copy(gone, tmp_path)


def test_the_harness_runs_the_copy_and_passes_unmutated(server, tmp_path):
    """An unchanged copy passes a named test (the machinery itself plants nothing), and a
    copy whose moelab cannot be imported ends the child before any test runs (not pytest's
    exit status 1): proof that the tests import moelab from the copy, not from src/."""
    tests = (f"{LOSSES}::test_balance_matches_loop_definition_on_random_routing",)
    rc, tail = run_planted(server, None, tests, tmp_path / "clean")
    assert rc == 0, tail
    broken = Mutation("moelab/__init__.py", '__version__ = "0.1.0"', 'raise ImportError("planted")', tests, "broken")
    rc, tail = run_planted(server, broken, tests, tmp_path / "broken")
    assert rc not in (0, 1) and "planted" in tail, tail
