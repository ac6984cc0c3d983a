//! Settings that no other trainer test runs, each end to end on the demo model for one to three
//! short steps (ndarray; the bf16 base on flex): every number finite, and the behaviour each
//! setting is for — k2 KL, the adaptive KL controller in both directions, critic warm-up, the
//! critic-free estimators, asymmetric clipping, token-mean aggregation, top-k/top-p rollouts,
//! the unclipped value loss (`value_clip = "off"`), `train.epochs` step counts, the production
//! defaults (recomputation, critic, LoRA on a bf16 base, ragged micro-batches) against the kept
//! graph, token-budget micro-batches, GSPO's sequence-level ratios, and DAPO's dynamic sampling,
//! overlong filtering and overlong reward shaping.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::AutodiffBackend;
use med_rlvr::config::TrainConfig;
use med_rlvr::trainer::{StepMetrics, Trainer};

type B = Autodiff<NdArray<f32>>;

/// Three prompts per micro-batch of two samples each, so micro-batches are ragged.
fn cfg(extra: &[&str]) -> TrainConfig {
    let mut set: Vec<String> = [
        "train.eval_every=0",
        "rollout.prompts_per_step=6",
        "rollout.max_new_tokens=12",
        "ppo.train_batch=6",
        "ppo.micro_batch=4",
        "optim.actor_lr=5e-4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &set).unwrap()
}

mod common;
use common::weights;

fn finite(m: &StepMetrics) {
    for (name, x) in [
        ("reward_mean", m.reward_mean),
        ("kl", m.kl),
        ("kl_coef", m.kl_coef),
        ("entropy", m.entropy),
        ("policy_loss", m.policy_loss),
        ("value_loss", m.value_loss),
        ("clip_frac", m.clip_frac),
        ("grad_norm", m.grad_norm),
        ("critic_grad_norm", m.critic_grad_norm),
    ] {
        assert!(x.is_finite(), "step {}: {name} = {x}", m.step);
    }
    assert!(
        m.skipped.is_none(),
        "step {} skipped: {:?}",
        m.step,
        m.skipped
    );
}

/// `steps` steps of `cfg(extra)`; returns the trainer and the metrics, each checked finite.
fn run<A: AutodiffBackend>(extra: &[&str], steps: usize) -> (Trainer<A>, Vec<StepMetrics>) {
    let mut t = Trainer::<A>::new(cfg(extra), Default::default()).unwrap();
    let m: Vec<StepMetrics> = (0..steps).map(|_| t.step().unwrap().0).collect();
    m.iter().for_each(finite);
    (t, m)
}

/// k2 (`d²/2`) shapes the rewards instead of k1 (`d`): step 0 is the same run (the policy is the
/// reference, d ≈ 0), step 1 is not. (The logged `kl` is k1 whatever the estimator.)
#[test]
fn k2_kl_shapes_the_rewards() {
    let (_, k2) = run::<B>(&["ppo.kl_estimator=\"k2\"", "ppo.kl_coef=0.5"], 2);
    let (_, k1) = run::<B>(&["ppo.kl_coef=0.5"], 2);
    assert_eq!(k2[0].reward_mean, k1[0].reward_mean);
    assert!(k1[1].kl != 0.0);
    assert!(
        k2[1].policy_loss != k1[1].policy_loss,
        "k2 and k1 gave the same step-1 loss {}",
        k1[1].policy_loss
    );
}

/// `β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)` after every step: up when the step's KL
/// is above the target, down when below.
#[test]
fn the_adaptive_kl_controller_follows_the_kl_against_its_target() {
    let horizon = "ppo.kl_horizon=6";
    for (target, must_rise) in [(1e-12, true), (10.0, false)] {
        let t = format!("ppo.kl_target={target:e}");
        let (_, m) = run::<B>(&[&t, horizon], 3);
        let mut beta = 0.01;
        let mut rose = false;
        for s in &m {
            // n = 6 samples, horizon 6: a factor of exactly 1.2 or 0.8.
            let want = if s.kl > target {
                beta * 1.2
            } else {
                beta * 0.8
            };
            assert!(
                (s.kl_coef - want).abs() < 1e-12,
                "target {target}: step {} KL {} took β {beta} to {}, not {want}",
                s.step,
                s.kl,
                s.kl_coef
            );
            rose |= s.kl_coef > beta;
            beta = s.kl_coef;
        }
        assert_eq!(rose, must_rise, "target {target}: {m:?}");
    }
}

#[test]
fn critic_warmup_trains_only_the_critic() {
    let mut t = Trainer::<B>::new(cfg(&["ppo.critic_warmup=1"]), Default::default()).unwrap();
    let actor0 = weights(&t.actor);
    let critic0 = weights(t.critic.as_ref().unwrap());
    let (m, _) = t.step().unwrap();
    finite(&m);
    assert!(
        actor0 == weights(&t.actor),
        "the actor moved during warm-up"
    );
    assert!(
        critic0 != weights(t.critic.as_ref().unwrap()),
        "the critic did not train"
    );
    let (m, _) = t.step().unwrap();
    finite(&m);
    assert!(
        actor0 != weights(&t.actor),
        "the actor did not train after warm-up"
    );
}

#[test]
fn critic_free_estimators_train_the_actor_without_a_critic() {
    for est in [
        "rloo",
        "dr_grpo",
        "reinforce_pp_baseline",
        "reinforce_pp",
        "grpo",
    ] {
        let estimator = format!("ppo.estimator=\"{est}\"");
        let (t, m) = run::<B>(
            &[&estimator, "rollout.n=2", "rollout.prompts_per_step=3"],
            2,
        );
        assert!(t.critic.is_none(), "{est}: a critic was built");
        assert!(m.iter().all(|s| s.value_loss == 0.0), "{est}: a value loss");
        assert!(
            m.iter().any(|s| s.grad_norm > 0.0),
            "{est}: no actor gradient"
        );
    }
}

#[test]
fn asymmetric_clipping_token_mean_and_top_k_top_p_rollouts_run() {
    for extra in [
        &["ppo.eps_low=0.1", "ppo.eps_high=0.3", "ppo.ppo_epochs=2"][..],
        &["ppo.loss_agg=\"token-mean\""][..],
        &["rollout.top_k=5", "rollout.top_p=0.8"][..],
        // GSPO and GSPO-token (sequence-level ratios) on GRPO advantages.
        &[
            "ppo.estimator=\"grpo\"",
            "rollout.n=2",
            "rollout.prompts_per_step=3",
            "ppo.ratio_level=\"sequence\"",
        ][..],
        &[
            "ppo.estimator=\"grpo\"",
            "rollout.n=2",
            "rollout.prompts_per_step=3",
            "ppo.ratio_level=\"sequence-token\"",
        ][..],
    ] {
        let (_, m) = run::<B>(extra, 1);
        assert!(m[0].grad_norm > 0.0, "{extra:?}: no gradient");
        assert!((0.0..=1.0).contains(&m[0].clip_frac), "{extra:?}");
    }
}

/// `ppo.value_clip = "off"` (TOML has no null) trains the critic on the unclipped value loss: the
/// numbers of a clip too wide to bind (1e9), not those of one that binds (0.01 once the critic has
/// moved within the step: two PPO epochs at a large critic learning rate). A run's saved
/// `config.toml` says "off" again, so a resume keeps it.
#[test]
fn value_clip_off_is_the_unclipped_value_loss() {
    let step = |clip: &str| {
        let extra = ["ppo.ppo_epochs=2", "optim.critic_lr=2e-2", clip];
        run::<B>(&extra, 1).1.remove(0)
    };
    let (off, wide, tight) = (
        step("ppo.value_clip=off"),
        step("ppo.value_clip=1e9"),
        step("ppo.value_clip=0.01"),
    );
    for (name, a, b) in [
        ("value_loss", off.value_loss, wide.value_loss),
        (
            "critic_grad_norm",
            off.critic_grad_norm,
            wide.critic_grad_norm,
        ),
    ] {
        assert!((a - b).abs() <= 1e-9 * a.abs(), "{name}: off {a}, 1e9 {b}");
    }
    assert!(
        (off.value_loss - tight.value_loss).abs() > 1e-3 * off.value_loss.abs(),
        "the 0.01 clip never bound: {} vs {}",
        off.value_loss,
        tight.value_loss
    );

    let out = tempfile::tempdir().unwrap();
    let c = cfg(&["train.steps=1", "ppo.value_clip=\"off\""]);
    assert_eq!(c.ppo.value_clip, None);
    let opts = med_rlvr::trainer::RunOptions {
        quiet: true,
        ..Default::default()
    };
    med_rlvr::trainer::run::<B>(c, out.path(), Default::default(), &opts).unwrap();
    let saved = out.path().join("config.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("value_clip = \"off\""), "{text}");
    assert_eq!(
        TrainConfig::load(Some(&saved), &[]).unwrap().ppo.value_clip,
        None
    );
}

#[test]
fn train_epochs_sets_the_step_count() {
    let t = Trainer::<B>::new(
        cfg(&[
            "train.steps=0",
            "train.epochs=2",
            "rollout.prompts_per_step=64",
            "ppo.train_batch=64",
        ]),
        Default::default(),
    )
    .unwrap();
    let items = t.train_items.len();
    assert_eq!(t.total_steps, (2 * items).div_ceil(64), "{items} items");
}

/// The production defaults — recomputation on, a critic, LoRA on a bf16 base, several ragged
/// micro-batches — give the same first step as the kept graph: same samples, and losses and
/// gradient norms within 1e-4 relative (flex, where bf16 runs).
#[test]
fn production_defaults_equal_the_kept_graph_on_a_bf16_base() {
    type F = Autodiff<Flex>;
    let base = [
        "lora.rank=4",
        "lora.alpha=8.0",
        "model.base_dtype=\"bf16\"",
        "optim.actor_lr=5e-3",
        "ppo.micro_batch=2",
    ];
    let step = |recompute: &str| {
        let mut set = base.to_vec();
        set.push(recompute);
        run::<F>(&set, 1).1.remove(0)
    };
    let (on, off) = (step("model.recompute=true"), step("model.recompute=false"));
    same_step(&on, &off, 1e-4, 1e-6);
    assert!(on.grad_norm > 0.0 && on.critic_grad_norm > 0.0);
}

/// Two runs' first steps: the same samples, and losses, gradient norms and KL within
/// `rel · max(|value|, floor)`.
fn same_step(a: &StepMetrics, b: &StepMetrics, rel: f64, floor: f64) {
    assert_eq!(a.reward_mean, b.reward_mean, "different samples");
    for (name, x, y) in [
        ("policy_loss", a.policy_loss, b.policy_loss),
        ("value_loss", a.value_loss, b.value_loss),
        ("grad_norm", a.grad_norm, b.grad_norm),
        ("critic_grad_norm", a.critic_grad_norm, b.critic_grad_norm),
        ("kl", a.kl, b.kl),
    ] {
        eprintln!("{name}: {x:e} vs {y:e}");
        assert!(
            (x - y).abs() <= rel * y.abs().max(floor),
            "{name}: {x} vs {y}"
        );
    }
}

/// Token-budget micro-batches (`ppo.micro_batch_tokens`, verl's `use_dynamic_bsz`): sequences
/// grouped by length under the budget instead of `ppo.micro_batch` samples; the loss weights are
/// the same, so a step has the sample-count split's losses and gradients, with the critic, for
/// both aggregations. The gradients are compared through the weights after one optimizer step
/// made linear in them (AdamW's ε = 1 ≫ |g|, lr 1: Δw = −g/(|g|·c + 1) ≈ −g); with the default
/// ε, Adam's division by √v would magnify the summation-order noise of entries that cancel.
#[test]
fn token_budget_micro_batches_give_the_gradient_of_the_sample_count_split() {
    for agg in ["seq-mean-token-mean", "token-mean"] {
        let agg = format!("ppo.loss_agg=\"{agg}\"");
        // One epoch of one mini-batch: one gradient, at the same weights.
        let sgd_like = [
            agg.as_str(),
            "ppo.ppo_epochs=1",
            "optim.eps=1.0",
            "optim.actor_lr=1.0",
            "optim.critic_lr=1.0",
        ];
        let (by_count, a) = run::<B>(&sgd_like, 1);
        let budget = [&sgd_like[..], &["ppo.micro_batch_tokens=250"]].concat();
        let (by_tokens, b) = run::<B>(&budget, 1);
        same_step(&b[0], &a[0], 1e-6, 1.0);
        // The same sequences, laid out with less padding (`update_tokens`,
        // `update_padded_tokens` in metrics.jsonl).
        let (count, tokens) = (&a[0], &b[0]);
        eprintln!(
            "{agg}: update tokens {} real; padded {} by count, {} by budget",
            count.update_tokens, count.update_padded_tokens, tokens.update_padded_tokens
        );
        assert!(count.update_tokens > 0);
        assert_eq!(tokens.update_tokens, count.update_tokens);
        assert!(count.update_padded_tokens >= count.update_tokens);
        assert!(tokens.update_padded_tokens >= tokens.update_tokens);
        assert!(tokens.update_padded_tokens < count.update_padded_tokens);
        let actor = common::assert_close(
            "actor",
            &weights(&by_tokens.actor),
            &weights(&by_count.actor),
            1e-6,
        );
        let critic = |t: &Trainer<B>| weights(t.critic.as_ref().unwrap());
        let critic = common::assert_close("critic", &critic(&by_tokens), &critic(&by_count), 1e-6);
        eprintln!("{agg}: largest weight difference actor {actor:.1e}, critic {critic:.1e}");
    }
}

/// DAPO's dynamic sampling (`rollout.filter_groups`): groups whose rewards are all equal are set
/// aside and more prompts drawn, up to `rollout.max_draws` batches, so the trained batch holds at
/// least the first draw's groups with differing rewards (its samples are the unfiltered run's:
/// the first draw is keyed the same), more whenever more draws were made, and set-aside groups
/// only when every draw was used. The logged share of zero-advantage groups is what remains.
#[test]
fn dynamic_sampling_fills_the_batch_with_groups_whose_rewards_differ() {
    // The direct prompt's 0/1 reward differs within some groups of the untrained demo model
    // (under r1 nearly every reply fails the format: all −1).
    let grpo = [
        "data.prompt=\"direct\"",
        "ppo.estimator=\"grpo\"",
        "rollout.n=4",
        "rollout.prompts_per_step=3",
        "ppo.train_batch=12",
    ];
    let (_, plain) = run::<B>(&grpo, 2);
    let filtered = [
        &grpo[..],
        &["rollout.filter_groups=true", "rollout.max_draws=3"],
    ]
    .concat();
    let (_, dapo) = run::<B>(&filtered, 2);
    for m in &plain {
        assert_eq!(m.groups_drawn, 3, "step {}", m.step);
        assert_eq!(m.zero_adv_groups, 1.0 - m.groups_kept as f64 / 3.0);
    }
    let mut more = 0;
    for m in &dapo {
        eprintln!(
            "step {}: groups drawn {}, kept {}, zero-advantage share {}",
            m.step, m.groups_drawn, m.groups_kept, m.zero_adv_groups
        );
        assert!([3, 6, 9].contains(&m.groups_drawn), "{}", m.groups_drawn);
        assert!(m.groups_kept <= 3);
        if m.groups_kept < 3 {
            assert_eq!(m.groups_drawn, 9, "stopped drawing with the batch not full");
        } else {
            assert!(m.groups_drawn <= 9);
        }
        assert_eq!(m.zero_adv_groups, 1.0 - m.groups_kept as f64 / 3.0);
        more += (m.groups_drawn > 3) as usize;
    }
    assert!(dapo[0].groups_kept >= plain[0].groups_kept);
    assert!(
        more > 0,
        "no step drew a second batch: the test shows nothing"
    );
    if dapo[0].groups_drawn == 3 {
        same_step(&dapo[0], &plain[0], 1e-6, 1.0);
    }
    // Under r1 every group of the untrained model is all −1: every draw is used, the batch is
    // topped up with set-aside groups, and the step trains on its full size all the same.
    let (_, r1) = run::<B>(&[&filtered[1..], &["data.prompt=\"r1\""]].concat(), 1);
    assert_eq!((r1[0].groups_drawn, r1[0].groups_kept), (9, 0));
    assert_eq!(r1[0].zero_adv_groups, 1.0);
}

/// DAPO's overlong filtering (`ppo.mask_truncated`): samples cut at `rollout.max_new_tokens` are
/// left out of both losses. With every sample cut (one new token, none of them a stop), nothing
/// trains: zero losses and gradients, weights unchanged; without the filter the same step trains.
#[test]
fn overlong_filtering_leaves_truncated_samples_out_of_the_loss() {
    let cut = ["rollout.max_new_tokens=1"];
    let before = Trainer::<B>::new(cfg(&cut), Default::default()).unwrap();
    let (on, m) = run::<B>(&[&cut[..], &["ppo.mask_truncated=true"]].concat(), 1);
    assert_eq!(
        m[0].truncated_rate, 1.0,
        "a sample was not cut: the test shows nothing"
    );
    assert_eq!((m[0].policy_loss, m[0].value_loss), (0.0, 0.0));
    assert_eq!((m[0].grad_norm, m[0].critic_grad_norm), (0.0, 0.0));
    assert_eq!(weights(&on.actor), weights(&before.actor));
    let (_, off) = run::<B>(&cut, 1);
    assert!(off[0].grad_norm > 0.0 && off[0].critic_grad_norm > 0.0);
}

/// DAPO's overlong reward shaping (`reward.overlong_buffer`): with the buffer the whole length
/// (12 of 12 tokens) and factor 0.5, every reward falls by `0.5·len/12`, so at step 0 (the same
/// samples) the mean reward is the plain one minus `0.5·mean length/12`.
#[test]
fn overlong_shaping_lowers_the_reward_by_the_length_past_the_free_zone() {
    let (_, plain) = run::<B>(&[], 1);
    let (_, shaped) = run::<B>(
        &["reward.overlong_buffer=12", "reward.overlong_penalty=0.5"],
        1,
    );
    assert_eq!(shaped[0].response_len_mean, plain[0].response_len_mean);
    let want = plain[0].reward_mean - 0.5 * plain[0].response_len_mean / 12.0;
    common::assert_close("reward_mean", &[shaped[0].reward_mean], &[want], 1e-6);
    assert_eq!(med_rlvr::reward::overlong_penalty(16, 20, 4, 1.0), 0.0);
    assert_eq!(med_rlvr::reward::overlong_penalty(17, 20, 4, 1.0), -0.25);
    assert_eq!(med_rlvr::reward::overlong_penalty(20, 20, 4, 2.0), -2.0);
    assert_eq!(med_rlvr::reward::overlong_penalty(20, 20, 0, 1.0), 0.0);
}

/// Every preset in `assets/presets` is a valid config (ranges and relationships checked).
#[test]
fn every_preset_is_a_valid_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/presets");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            TrainConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e:#}"));
            n += 1;
        }
    }
    assert!(n >= 4, "{n} presets");
}
