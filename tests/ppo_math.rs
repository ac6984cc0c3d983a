//! PPO math against the reference implementations' own functions: OpenRLHF v0.5.9 and verl 0.4.1,
//! loaded from their wheels by `tests/fixtures/make_ppo_math_reference.py` and run in float64 on
//! six batches (5×9 — the original OpenRLHF fixture's inputs —, 8×13, 6×4, 4×1, 12×7, 9×22; ragged
//! masks, both clip sides binding, groups of 2–5 samples per prompt). Every KL estimator, the
//! KL-shaped rewards, GAE, whitening, the clipped policy loss (symmetric and asymmetric, both
//! aggregations), the value and KL losses with their gradients, and every critic-free estimator;
//! plus hand-checked cases.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use med_rlvr::advantages::{self as adv, Grid, KlEstimator};
use med_rlvr::estimator::{self, Estimator, Inputs, ESTIMATORS};
use med_rlvr::loss::{self, Aggregation, Surrogate};
use serde_json::Value;

mod common;
use common::floats;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ppo_math_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn grid(v: &Value) -> Grid {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn assert_close(got: &Grid, want: &Grid, tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        common::assert_close(&format!("{what}[{i}]"), g, w, tol);
    }
}

#[test]
fn kl_rewards_gae_whitening_match_the_references() {
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let mask = grid(&case["action_mask"]);
        let old = grid(&case["old_log_probs"]);
        let reference = grid(&case["ref_log_probs"]);
        // GAE runs at rollout time on the critic's values then: `old_values`.
        let values = grid(&case["old_values"]);
        let r = floats(&case["sequence_rewards"]);
        // OpenRLHF casts the log-probs to float32 before the KL (`.float()`), hence 1e-6.
        let k1 = adv::kl(&old, &reference, &mask, KlEstimator::K1);
        assert_close(&k1, &grid(&o["kl_k1"]), 1e-6, "kl_k1");
        assert_close(
            &adv::kl(&old, &reference, &mask, KlEstimator::K3),
            &grid(&o["kl_k3"]),
            1e-6,
            "kl_k3",
        );
        // k2 = d²/2 (verl's "k2"), computed in float64 there.
        assert_close(
            &adv::kl(&old, &reference, &mask, KlEstimator::K2),
            &grid(&o["kl_k2"]),
            1e-12,
            "kl_k2",
        );
        for est in ["k1", "k2", "k3"] {
            let kl = grid(&o[format!("kl_{est}").as_str()]);
            for beta in [0.01, 0.05] {
                let key = format!("token_rewards_{est}_beta{beta}");
                let tr = adv::token_rewards(&r, &kl, &mask, beta);
                assert_close(&tr, &grid(&o[key.as_str()]), 1e-12, &key);
            }
        }
        let rewards = grid(&o["token_rewards_k1_beta0.01"]);
        for (g, l) in [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95)] {
            let key = format!("gae_gamma{g:?}_lambda{l:?}");
            let (a, ret) = adv::gae(&rewards, &values, &mask, g, l);
            assert_close(&a, &grid(&o[key.as_str()]["advantages"]), 1e-12, &key);
            assert_close(&ret, &grid(&o[key.as_str()]["returns"]), 1e-12, &key);
        }
        // The trainer's path: the `gae` estimator on sequence rewards and k1 KL with β = 0.01.
        let kl = grid(&o["kl_k1"]);
        let est = estimator::estimate_local(
            est("gae"),
            &Inputs {
                rewards: &r,
                group_size: 1,
                kl: &kl,
                beta: 0.01,
                mask: &mask,
                values: Some(&values),
                gamma: 1.0,
                lambda: 1.0,
            },
        )
        .unwrap();
        let key = "gae_gamma1.0_lambda1.0";
        assert_close(&est.returns, &grid(&o[key]["returns"]), 1e-12, key);
        let w = est.advantages;
        // OpenRLHF's normalize takes the mean and std in float32 (`.float()`), hence 1e-6.
        // Compare valid tokens (padding positions are masked out of every loss).
        assert_close(
            &masked(&w, &mask),
            &masked(&grid(&o["whitened_advantages_gamma1.0_lambda1.0"]), &mask),
            1e-6,
            "whitened",
        );
    }
}

/// The estimator `name` of the table.
fn est(name: &str) -> Estimator {
    Estimator::by_name(name).unwrap()
}

/// `g` with padding positions zeroed.
fn masked(g: &Grid, mask: &Grid) -> Grid {
    g.iter()
        .zip(mask)
        .map(|(r, m)| r.iter().zip(m).map(|(x, y)| x * y).collect())
        .collect()
}

fn t2<B: Backend>(g: &Grid, dev: &B::Device) -> Tensor<B, 2> {
    let (b, n) = (g.len(), g[0].len());
    Tensor::from_data(TensorData::new(g.concat(), [b, n]), dev)
}

fn to_grid<B: Backend>(t: Tensor<B, 2>) -> Grid {
    let [_, n] = t.dims();
    let v: Vec<f64> = t.into_data().iter::<f64>().collect();
    v.chunks(n).map(|c| c.to_vec()).collect()
}

/// Losses and their gradients through Burn's autodiff, at tolerance `tol`.
fn losses_match<B: burn::tensor::backend::AutodiffBackend>(tol: f64) {
    let dev = Default::default();
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let mask = t2::<B>(&grid(&case["action_mask"]), &dev);
        let advs = t2::<B>(&grid(&o["whitened_advantages_gamma1.0_lambda1.0"]), &dev);
        let logp = t2::<B>(&grid(&case["log_probs"]), &dev).require_grad();
        let old = t2::<B>(&grid(&case["old_log_probs"]), &dev);
        let (l, _) = loss::policy_loss(
            logp.clone(),
            old,
            advs,
            mask.clone(),
            &Surrogate::token(0.2, 0.2, Aggregation::SeqMeanTokenMean),
            None,
        );
        let want = o["policy_loss_eps0.2"]["loss"].as_f64().unwrap();
        let got = l.clone().into_data().iter::<f64>().next().unwrap();
        assert!((got - want).abs() <= tol, "policy loss {got} vs {want}");
        let grads = l.backward();
        let g = to_grid::<B::InnerBackend>(logp.grad(&grads).unwrap());
        assert_close(
            &g,
            &grid(&o["policy_loss_eps0.2"]["grad_log_probs"]),
            tol,
            "grad_log_probs",
        );
        let returns = t2::<B>(&grid(&o["gae_gamma1.0_lambda1.0"]["returns"]), &dev);
        for (key, clip) in [
            ("value_loss_clip0.2", Some(0.2)),
            ("value_loss_noclip", None),
        ] {
            let values = t2::<B>(&grid(&case["values"]), &dev).require_grad();
            let old_v = t2::<B>(&grid(&case["old_values"]), &dev);
            let l = loss::value_loss(
                values.clone(),
                old_v,
                returns.clone(),
                mask.clone(),
                clip,
                Aggregation::SeqMeanTokenMean,
            );
            let got = l.clone().into_data().iter::<f64>().next().unwrap();
            let want = o[key]["loss"].as_f64().unwrap();
            assert!((got - want).abs() <= tol, "{key} {got} vs {want}");
            let grads = l.backward();
            let g = to_grid::<B::InnerBackend>(values.grad(&grads).unwrap());
            assert_close(&g, &grid(&o[key]["grad_values"]), tol, key);
        }
    }
}

#[test]
fn losses_and_gradients_match_openrlhf_f64() {
    losses_match::<Autodiff<NdArray<f64>>>(1e-6);
}

#[test]
fn losses_and_gradients_match_openrlhf_f32() {
    losses_match::<Autodiff<NdArray<f32>>>(1e-4);
}

#[test]
fn token_mean_aggregation_weights_every_token_equally() {
    type B = NdArray<f64>;
    let dev = Default::default();
    let x = t2::<B>(&vec![vec![1.0, 1.0, 1.0], vec![4.0, 0.0, 0.0]], &dev);
    let m = t2::<B>(&vec![vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]], &dev);
    let s = |agg| {
        loss::aggregate(x.clone(), m.clone(), agg)
            .into_data()
            .iter::<f64>()
            .next()
            .unwrap()
    };
    assert!((s(Aggregation::SeqMeanTokenMean) - 2.5).abs() < 1e-12); // (1 + 4) / 2
    assert!((s(Aggregation::TokenMean) - 7.0 / 4.0).abs() < 1e-12); // (3 + 4) / 4
}

#[test]
fn critic_free_estimators_by_hand() {
    // Two prompts, n = 3 samples each.
    let r = [1.0, 0.0, 0.0, 1.0, 1.0, -1.0];
    let g = |name| estimator::shape_sequence_rewards(&r, 3, est(name));
    // Group 1: mean 1/3, unbiased std √(1/3); group 2: mean 1/3, unbiased std √(4/3).
    let s1 = (1.0f64 / 3.0).sqrt();
    let s2 = (4.0f64 / 3.0).sqrt();
    let want_grpo = [
        2.0 / 3.0 / s1,
        -1.0 / 3.0 / s1,
        -1.0 / 3.0 / s1,
        2.0 / 3.0 / s2,
        2.0 / 3.0 / s2,
        -4.0 / 3.0 / s2,
    ];
    common::assert_close("grpo", &g("grpo"), &want_grpo, 1e-8);
    let close = |a: Vec<f64>, b: &[f64]| {
        common::assert_close("critic-free advantages", &a, b, 1e-12);
        true
    };
    assert!(close(
        g("dr_grpo"),
        &[
            2.0 / 3.0,
            -1.0 / 3.0,
            -1.0 / 3.0,
            2.0 / 3.0,
            2.0 / 3.0,
            -4.0 / 3.0
        ]
    ));
    // RLOO: R_i − mean of the other two.
    assert!(close(g("rloo"), &[1.0, -0.5, -0.5, 1.0, 1.0, -2.0]));
    assert!(close(g("reinforce_pp"), &r));
    assert!(close(g("reinforce_pp_baseline"), &g("dr_grpo")));
    // Return-to-go over KL-shaped token rewards, γ = 1: advantage at t = R − β·Σ_{s≥t} kl_s.
    let mask = vec![vec![1.0, 1.0, 1.0], vec![1.0, 1.0, 0.0]];
    let kl = vec![vec![0.1, 0.2, 0.3], vec![0.5, -0.5, 0.0]];
    let critic_free = |name| {
        let x = Inputs {
            rewards: &[1.0, 0.0],
            group_size: 2,
            kl: &kl,
            beta: 0.1,
            mask: &mask,
            values: None,
            gamma: 1.0,
            lambda: 1.0,
        };
        estimator::estimate_local(est(name), &x).unwrap().advantages
    };
    let a = critic_free("dr_grpo");
    let want = [
        [0.5 - 0.06, 0.5 - 0.05, 0.5 - 0.03],
        [-0.5 - 0.0, -0.5 + 0.05, 0.0],
    ];
    assert_eq!(a.len(), want.len());
    for (row, w) in a.iter().zip(want) {
        common::assert_close("return-to-go advantages", row, &w, 1e-12);
    }
    // reinforce_pp whitens: valid tokens have mean 0 and unit population variance.
    let w = critic_free("reinforce_pp");
    let (m, v) = adv::masked_moments(&w, &mask);
    assert!(m.abs() < 1e-12 && (v - 1.0).abs() < 1e-9);
}

/// Truncated importance sampling on the OpenRLHF fixture: with the sampler's log-probs equal to
/// the trainer's the weights are 1 and the loss is OpenRLHF's; with `π_old / π_rollout = c` on
/// every token the loss and its gradient scale by `min(c, cap)`.
#[test]
fn truncated_importance_weights_scale_the_openrlhf_policy_loss() {
    type B = Autodiff<NdArray<f64>>;
    let dev = Default::default();
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let want = o["policy_loss_eps0.2"]["loss"].as_f64().unwrap();
        let want_grad = grid(&o["policy_loss_eps0.2"]["grad_log_probs"]);
        let old = grid(&case["old_log_probs"]);
        for (c, cap, scale) in [
            (1.0, 2.0, 1.0),
            (1.5, 2.0, 1.5),
            (3.0, 2.0, 2.0),
            (0.25, 2.0, 0.25),
        ] {
            // Sampler log-probs with π_old / π_rollout = c everywhere.
            let rollout: Grid = old
                .iter()
                .map(|row| row.iter().map(|x| x - f64::ln(c)).collect())
                .collect();
            let w: Grid = old
                .iter()
                .zip(&rollout)
                .map(|(o, r)| loss::truncated_is_weights(o, r, cap))
                .collect();
            assert!(w.iter().flatten().all(|x| (x - scale).abs() < 1e-12));
            let logp = t2::<B>(&grid(&case["log_probs"]), &dev).require_grad();
            let (l, _) = loss::policy_loss(
                logp.clone(),
                t2::<B>(&old, &dev),
                t2::<B>(&grid(&o["whitened_advantages_gamma1.0_lambda1.0"]), &dev),
                t2::<B>(&grid(&case["action_mask"]), &dev),
                &Surrogate::token(0.2, 0.2, Aggregation::SeqMeanTokenMean),
                Some(t2::<B>(&w, &dev)),
            );
            let got = l.clone().into_data().iter::<f64>().next().unwrap();
            assert!(
                (got - scale * want).abs() < 1e-6,
                "c={c}: {got} vs {}",
                scale * want
            );
            let g = to_grid::<NdArray<f64>>(logp.grad(&l.backward()).unwrap());
            let scaled: Grid = want_grad
                .iter()
                .map(|row| row.iter().map(|x| x * scale).collect())
                .collect();
            assert_close(&g, &scaled, 1e-6, "TIS-weighted grad_log_probs");
        }
    }
    // Huge log-ratios are clamped before the exp, then capped.
    assert_eq!(loss::truncated_is_weights(&[0.0], &[-1e6], 5.0), vec![5.0]);
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap()
}

/// A loss and its gradient with respect to `input` against a fixture entry (`loss`, `grad`).
fn loss_and_grad(
    what: &str,
    l: Tensor<Autodiff<NdArray<f64>>, 1>,
    input: &Tensor<Autodiff<NdArray<f64>>, 2>,
    want: &Value,
    grad: &str,
    tol: f64,
) {
    let got = scalar(l.clone());
    common::assert_close(what, &[got], &[want["loss"].as_f64().unwrap()], tol);
    let g = to_grid::<NdArray<f64>>(input.grad(&l.backward()).unwrap());
    assert_close(&g, &grid(&want[grad]), tol, what);
}

/// verl's `compute_policy_loss` with asymmetric clipping (`cliprange_low/high`) under both
/// aggregations, its value loss and GRPO's k3 KL loss, losses, gradients and clip fractions.
#[test]
fn asymmetric_clipping_and_both_aggregations_match_verl() {
    type B = Autodiff<NdArray<f64>>;
    // Both in float64; verl's token means divide by `Σm + 1e-8`, hence 1e-8 (the losses agree
    // to ~1e-11 otherwise).
    const TOL: f64 = 1e-8;
    let dev = Default::default();
    let f = fixture();
    let aggs = [
        ("token-mean", Aggregation::TokenMean),
        ("seq-mean-token-mean", Aggregation::SeqMeanTokenMean),
    ];
    let mut compared = 0;
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let mask = t2::<B>(&grid(&case["action_mask"]), &dev);
        let advs = t2::<B>(&grid(&o["whitened_advantages_gamma1.0_lambda1.0"]), &dev);
        let old = t2::<B>(&grid(&case["old_log_probs"]), &dev);
        let reference = t2::<B>(&grid(&case["ref_log_probs"]), &dev);
        let returns = t2::<B>(&grid(&o["gae_gamma1.0_lambda1.0"]["returns"]), &dev);
        for (name, agg) in aggs {
            for (low, high) in [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)] {
                let want = &o[format!("verl_policy_loss_low{low}_high{high}_{name}").as_str()];
                let logp = t2::<B>(&grid(&case["log_probs"]), &dev).require_grad();
                let (l, clip_frac) = loss::policy_loss(
                    logp.clone(),
                    old.clone(),
                    advs.clone(),
                    mask.clone(),
                    &Surrogate::token(low, high, agg),
                    None,
                );
                let what = format!("policy loss eps {low}/{high} {name}");
                common::assert_close(
                    &what,
                    &[scalar(l.clone()), clip_frac],
                    &[
                        want["loss"].as_f64().unwrap(),
                        want["clip_frac"].as_f64().unwrap(),
                    ],
                    TOL,
                );
                let g = to_grid::<NdArray<f64>>(logp.grad(&l.backward()).unwrap());
                assert_close(&g, &grid(&want["grad_log_probs"]), TOL, &what);
                compared += 1;
            }
            let want = &o[format!("verl_value_loss_clip0.2_{name}").as_str()];
            let values = t2::<B>(&grid(&case["values"]), &dev).require_grad();
            let l = loss::value_loss(
                values.clone(),
                t2::<B>(&grid(&case["old_values"]), &dev),
                returns.clone(),
                mask.clone(),
                Some(0.2),
                agg,
            );
            loss_and_grad(
                &format!("value loss {name}"),
                l,
                &values,
                want,
                "grad_values",
                TOL,
            );

            let want = &o[format!("verl_kl_loss_k3_{name}").as_str()];
            let logp = t2::<B>(&grid(&case["log_probs"]), &dev).require_grad();
            let l = loss::kl_loss(logp.clone(), reference.clone(), mask.clone(), agg);
            let what = format!("k3 KL loss {name}");
            loss_and_grad(&what, l, &logp, want, "grad_log_probs", TOL);
        }
    }
    assert_eq!(compared, 6 * 2 * 3);
}

/// The critic-free estimators on outcome rewards against verl (GRPO, Dr. GRPO = GRPO without the
/// std, RLOO, REINFORCE++ with the group baseline) and OpenRLHF (REINFORCE++ with KL-shaped token
/// rewards and a discount).
#[test]
fn critic_free_estimators_match_verl_and_openrlhf() {
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let mask = grid(&case["action_mask"]);
        let r = floats(&case["sequence_rewards"]);
        let n = case["group_size"].as_u64().unwrap() as usize;
        let zero_kl: Grid = mask.iter().map(|m| vec![0.0; m.len()]).collect();
        let ours = |name, kl: &Grid, beta, gamma| {
            let x = Inputs {
                rewards: &r,
                group_size: n,
                kl,
                beta,
                mask: &mask,
                values: None,
                gamma,
                lambda: 1.0,
            };
            masked(
                &estimator::estimate_local(est(name), &x).unwrap().advantages,
                &mask,
            )
        };
        for (est, key) in [
            ("grpo", "verl_grpo_eps1e-9"),
            ("dr_grpo", "verl_grpo_no_std"),
            ("rloo", "verl_rloo"),
        ] {
            assert_close(&ours(est, &zero_kl, 0.0, 1.0), &grid(&o[key]), 1e-12, key);
        }
        // verl whitens with the unbiased variance, the trainer (as OpenRLHF) with the population
        // one: `A_verl · √(var_unbiased + 1e-8) / √max(var_population, 1e-8)` is the trainer's
        // (within 1e-8: verl's masked mean divides by `Σm + 1e-8`).
        let b = &o["verl_reinforce_pp_baseline"];
        let (vu, vp) = (
            b["var_unbiased"].as_f64().unwrap(),
            b["var_population"].as_f64().unwrap(),
        );
        let scale = (vu + 1e-8).sqrt() / vp.max(1e-8).sqrt();
        let want: Grid = grid(&b["advantages"])
            .iter()
            .map(|row| row.iter().map(|x| x * scale).collect())
            .collect();
        let got = ours("reinforce_pp_baseline", &zero_kl, 0.0, 1.0);
        assert_close(&got, &masked(&want, &mask), 1e-8, "reinforce_pp_baseline");
        // OpenRLHF whitens in float32 (`.float()`), hence 1e-6.
        let kl = grid(&o["kl_k1"]);
        for gamma in [1.0, 0.99] {
            let key = format!("reinforce_pp_beta0.05_gamma{gamma:?}");
            let got = ours("reinforce_pp", &kl, 0.05, gamma);
            assert_close(&got, &masked(&grid(&o[key.as_str()]), &mask), 1e-6, &key);
        }
    }
}

/// The estimator table: every name the README lists, each found by its name and written back as
/// it (a saved `config.toml`), an unknown name refused with the list.
#[test]
fn estimators_are_looked_up_by_name() {
    let names: Vec<&str> = ESTIMATORS.iter().map(|e| e.name).collect();
    assert_eq!(
        names,
        [
            "gae",
            "grpo",
            "dr_grpo",
            "rloo",
            "reinforce_pp",
            "reinforce_pp_baseline"
        ]
    );
    for e in ESTIMATORS {
        assert_eq!(est(e.name), *e);
        let json = serde_json::to_string(e).unwrap();
        assert_eq!(json, format!("{:?}", e.name));
        assert_eq!(serde_json::from_str::<Estimator>(&json).unwrap(), *e);
        assert_eq!(e.uses_critic, e.name == "gae", "{}", e.name);
    }
    assert_eq!(Estimator::default(), est("gae"));
    let err = Estimator::by_name("ppo").unwrap_err();
    assert!(
        err.contains("\"ppo\"") && err.contains("gae, grpo, dr_grpo, rloo"),
        "{err}"
    );
}

/// GSPO against verl 0.9.1's `compute_policy_loss_gspo` (GSPO-token; fixture written by
/// `tests/fixtures/make_gspo_reference.py`, float64, five ragged batches): losses, gradients and
/// clip fractions for the paper's ε (3e-4/4e-4) and wider ones, both aggregations. With one
/// advantage per sequence both of the trainer's sequence levels must give verl's numbers (GSPO
/// and GSPO-token coincide there); with per-token advantages, GSPO-token must, and sequence-level
/// GSPO must not (it sees the tokens' advantages through one shared ratio and one gradient).
#[test]
fn gspo_sequence_ratios_match_verl() {
    use med_rlvr::loss::RatioLevel;
    type B = Autodiff<NdArray<f64>>;
    // verl's sequence means divide by `Σm + 1e-8`, its token means likewise.
    const TOL: f64 = 1e-8;
    let dev = Default::default();
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gspo_reference.json"
    );
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let aggs = [
        ("token-mean", Aggregation::TokenMean),
        ("seq-mean-token-mean", Aggregation::SeqMeanTokenMean),
    ];
    let (mut compared, mut differed) = (0, 0);
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let mask = t2::<B>(&grid(&case["action_mask"]), &dev);
        let old = t2::<B>(&grid(&case["old_log_probs"]), &dev);
        for adv_key in ["seq_advantages", "token_advantages"] {
            let advs = t2::<B>(&grid(&case[adv_key]), &dev);
            for (name, agg) in aggs {
                for (low, high) in [(0.2, 0.2), (3e-4, 4e-4), (0.1, 0.3)] {
                    let want = &o[format!("gspo_{adv_key}_low{low}_high{high}_{name}").as_str()];
                    for level in [RatioLevel::Sequence, RatioLevel::SequenceToken] {
                        let logp = t2::<B>(&grid(&case["log_probs"]), &dev).require_grad();
                        let s = Surrogate {
                            eps_low: low,
                            eps_high: high,
                            level,
                            agg,
                        };
                        let (l, clip_frac) = loss::policy_loss(
                            logp.clone(),
                            old.clone(),
                            advs.clone(),
                            mask.clone(),
                            &s,
                            None,
                        );
                        let got = [scalar(l.clone()), clip_frac];
                        let g = to_grid::<NdArray<f64>>(logp.grad(&l.backward()).unwrap());
                        let what = format!("{level:?} {adv_key} eps {low}/{high} {name}");
                        if level == RatioLevel::Sequence && adv_key == "token_advantages" {
                            let want = grid(&want["grad_log_probs"]);
                            let gap = g
                                .iter()
                                .flatten()
                                .zip(want.iter().flatten())
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, |m: f64, d| if d.is_nan() || d > m { d } else { m });
                            assert!(gap.is_finite(), "{what}: non-finite gradient");
                            differed += (gap > 1e-3) as usize;
                            continue;
                        }
                        let want_scalars = [
                            want["loss"].as_f64().unwrap(),
                            want["clip_frac"].as_f64().unwrap(),
                        ];
                        common::assert_close(&what, &got, &want_scalars, TOL);
                        assert_close(&g, &grid(&want["grad_log_probs"]), TOL, &what);
                        compared += 1;
                    }
                }
            }
        }
    }
    assert_eq!(compared, 5 * 3 * 2 * 3);
    // Per-token advantages tell the two levels apart on every multi-token case.
    assert!(
        differed >= 16,
        "sequence-level GSPO matched GSPO-token {differed}"
    );
}

/// At the token level, [`loss::log_ratio`] is `log π − log π_old`; at the sequence level every
/// token of a row holds the row's masked mean (the geometric mean of its ratios), padding
/// ignored; GSPO-token has that value too.
#[test]
fn sequence_ratio_is_the_geometric_mean_of_the_token_ratios() {
    use med_rlvr::loss::RatioLevel;
    type B = NdArray<f64>;
    let dev = Default::default();
    let logp = t2::<B>(&vec![vec![-1.0, -2.0, -0.5], vec![-0.1, -0.2, 0.0]], &dev);
    let old = t2::<B>(&vec![vec![-1.5, -1.0, -0.5], vec![-0.4, 0.0, 0.0]], &dev);
    let mask = t2::<B>(&vec![vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]], &dev);
    let token = to_grid(loss::log_ratio(
        logp.clone(),
        old.clone(),
        mask.clone(),
        RatioLevel::Token,
    ));
    assert_close(
        &token,
        &vec![vec![0.5, -1.0, 0.0], vec![0.3, -0.2, 0.0]],
        1e-12,
        "token",
    );
    for level in [RatioLevel::Sequence, RatioLevel::SequenceToken] {
        let seq = to_grid(loss::log_ratio(
            logp.clone(),
            old.clone(),
            mask.clone(),
            level,
        ));
        let row0 = (0.5 - 1.0 + 0.0) / 3.0;
        assert_close(&seq, &vec![vec![row0; 3], vec![0.3; 3]], 1e-12, "sequence");
    }
}
