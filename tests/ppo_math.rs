//! PPO math against OpenRLHF v0.5.9's own functions (fixture computed by them in float64), and
//! hand-checked critic-free estimators.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use med_rlvr::advantages::{self as adv, Estimator, Grid, KlEstimator};
use med_rlvr::loss::{self, Aggregation};
use serde_json::Value;

mod common;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openrlhf_v0.5.9_ppo_math.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn grid(v: &Value) -> Grid {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(got: &Grid, want: &Grid, tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        common::assert_close(&format!("{what}[{i}]"), g, w, tol);
    }
}

#[test]
fn kl_rewards_gae_whitening_match_openrlhf() {
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let o = &case["outputs"];
        let mask = grid(&case["action_mask"]);
        let old = grid(&case["old_log_probs"]);
        let reference = grid(&case["ref_log_probs"]);
        // GAE runs at rollout time on the critic's values then: `old_values`.
        let values = grid(&case["old_values"]);
        let r = vec1(&case["sequence_rewards"]);
        // OpenRLHF casts the log-probs to float32 before the KL (`.float()`), hence 1e-6.
        let k1 = adv::kl(&old, &reference, &mask, KlEstimator::K1);
        assert_close(&k1, &grid(&o["kl_k1"]), 1e-6, "kl_k1");
        assert_close(
            &adv::kl(&old, &reference, &mask, KlEstimator::K3),
            &grid(&o["kl_k3"]),
            1e-6,
            "kl_k3",
        );
        let k1_fixture = grid(&o["kl_k1"]);
        for beta in [0.01, 0.05] {
            let tr = adv::token_rewards(&r, &k1_fixture, &mask, beta);
            // OpenRLHF builds the token rewards in float32: agreement to ~1e-8.
            assert_close(
                &tr,
                &grid(&o[format!("token_rewards_k1_beta{beta}").as_str()]),
                1e-6,
                "token_rewards",
            );
        }
        let rewards = grid(&o["token_rewards_k1_beta0.01"]);
        for (g, l) in [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95)] {
            let key = format!("gae_gamma{g:?}_lambda{l:?}");
            let (a, ret) = adv::gae(&rewards, &values, &mask, g, l);
            assert_close(&a, &grid(&o[key.as_str()]["advantages"]), 1e-12, &key);
            assert_close(&ret, &grid(&o[key.as_str()]["returns"]), 1e-12, &key);
        }
        let (a, _) = adv::gae(&rewards, &values, &mask, 1.0, 1.0);
        let w = adv::whiten(&a, &mask);
        // Compare valid tokens (padding positions are masked out of every loss).
        let masked = |g: &Grid| -> Grid {
            g.iter()
                .zip(&mask)
                .map(|(r, m)| r.iter().zip(m).map(|(x, y)| x * y).collect())
                .collect()
        };
        assert_close(
            &masked(&w),
            &masked(&grid(&o["whitened_advantages_gamma1.0_lambda1.0"])),
            1e-12,
            "whitened",
        );
    }
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
            0.2,
            0.2,
            Aggregation::SeqMeanTokenMean,
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
    let g = |est| adv::shape_sequence_rewards(&r, 3, est);
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
    common::assert_close("grpo", &g(Estimator::Grpo), &want_grpo, 1e-8);
    let close = |a: Vec<f64>, b: &[f64]| {
        common::assert_close("critic-free advantages", &a, b, 1e-12);
        true
    };
    assert!(close(
        g(Estimator::DrGrpo),
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
    assert!(close(
        g(Estimator::Rloo),
        &[1.0, -0.5, -0.5, 1.0, 1.0, -2.0]
    ));
    assert!(close(g(Estimator::ReinforcePp), &r));
    assert!(close(
        g(Estimator::ReinforcePpBaseline),
        &g(Estimator::DrGrpo)
    ));
    // Return-to-go over KL-shaped token rewards, γ = 1: advantage at t = R − β·Σ_{s≥t} kl_s.
    let mask = vec![vec![1.0, 1.0, 1.0], vec![1.0, 1.0, 0.0]];
    let kl = vec![vec![0.1, 0.2, 0.3], vec![0.5, -0.5, 0.0]];
    let a = adv::critic_free_advantages(&[1.0, 0.0], 2, &kl, &mask, 0.1, 1.0, Estimator::DrGrpo);
    let want = [
        [0.5 - 0.06, 0.5 - 0.05, 0.5 - 0.03],
        [-0.5 - 0.0, -0.5 + 0.05, 0.0],
    ];
    assert_eq!(a.len(), want.len());
    for (row, w) in a.iter().zip(want) {
        common::assert_close("return-to-go advantages", row, &w, 1e-12);
    }
    // reinforce_pp whitens: valid tokens have mean 0 and unit population variance.
    let w =
        adv::critic_free_advantages(&[1.0, 0.0], 2, &kl, &mask, 0.1, 1.0, Estimator::ReinforcePp);
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
                0.2,
                0.2,
                Aggregation::SeqMeanTokenMean,
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
