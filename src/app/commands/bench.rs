//! `med-rlvr bench`: throughput of a geometry with random weights (`crate::app::bench`).

use std::io::Write;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use qwen2_burn::{Qwen2, Qwen2Config};

use crate::app::cli::{BenchArgs, BenchDtype};

pub(crate) fn run<A: AutodiffBackend>(a: BenchArgs, device: &A::Device) -> Result<()> {
    type B<A> = <A as AutodiffBackend>::InnerBackend;
    if let Some(count) = a.verifier {
        outln!(
            "{}",
            serde_json::to_string(&crate::app::bench::verifier(count, 0))?
        );
        return Ok(());
    }
    let mut config = Qwen2Config::from_file(a.config.as_deref().context("--config is required")?)?;
    if let Some(n) = a.layers {
        if n > config.num_hidden_layers {
            bail!(
                "--layers {n}: the geometry has only {} decoder layers",
                config.num_hidden_layers
            );
        }
        config.num_hidden_layers = n;
    }
    med_rlvr::tokenizer::check_context(
        config.max_position_embeddings,
        a.prompt_len + a.new_tokens,
        &format!(
            "--prompt-len {} and --new-tokens {}",
            a.prompt_len, a.new_tokens
        ),
    )?;
    if a.micro_batches {
        let budget = a
            .micro_batch_tokens
            .context("--micro-batches needs --micro-batch-tokens")?;
        let min_response = a.min_new_tokens.unwrap_or(a.new_tokens);
        if min_response > a.new_tokens {
            bail!(
                "--min-new-tokens {min_response} is above --new-tokens {}",
                a.new_tokens
            );
        }
        let model = Qwen2::<A>::init_random(&config, 0, device);
        let line = crate::app::bench::micro_batches(
            &model,
            config.vocab_size,
            crate::app::bench::MixShape {
                batch: a.batch,
                prompt_len: a.prompt_len,
                min_response,
                max_response: a.new_tokens,
                micro_batch: a.micro_batch,
                budget,
                chunk: a.chunk,
                recompute: !a.no_recompute,
            },
            device,
        )?;
        outln!("{}", serde_json::to_string(&line)?);
        return Ok(());
    }
    if a.update {
        let spec = qwen2_burn::LoraSpec {
            rank: a.lora_rank,
            alpha: 2.0 * a.lora_rank as f64,
            targets: qwen2_burn::PROJECTIONS.map(String::from).to_vec(),
        };
        let model = Qwen2::<A>::init_random(&config, 0, device).with_lora(&spec, 0, device);
        let line = crate::app::bench::update(
            &config,
            &model,
            &spec,
            crate::app::bench::UpdateShape {
                batch: a.batch,
                prompt_len: a.prompt_len,
                response_len: a.new_tokens,
                chunk: a.chunk,
                recompute: !a.no_recompute,
            },
            device,
        )?;
        outln!("{}", serde_json::to_string(&line)?);
        return Ok(());
    }
    if a.products {
        let main_thread = if a.outside_pool { "outside" } else { "inside" };
        let line =
            crate::app::bench::products::<B<A>>(&config, a.batch, a.passes, main_thread, device);
        return print_line(&serde_json::to_value(line)?, a.json);
    }
    let mut model = Qwen2::<B<A>>::init_random(&config, 0, device);
    if a.dtype == BenchDtype::Bf16 {
        if !B::<A>::supports_dtype(device, burn::tensor::DType::BF16) {
            bail!("--dtype bf16: this backend has no bf16 tensors; build with --features cuda or flex");
        }
        model = model.with_base_dtype(burn::tensor::FloatDType::BF16);
    }
    let line = if a.rollout {
        serde_json::to_value(crate::app::bench::rollout(
            &config,
            &model,
            a.batch,
            a.n,
            a.prompt_len,
            a.new_tokens,
            crate::app::bench::RolloutShape {
                stop_every: a.stop_every,
                mask: a.mask,
                max_rows: a.max_rows,
                slices: a.slices,
                prefill_per_sample: a.no_share_prefill,
            },
            device,
        ))?
    } else {
        serde_json::to_value(crate::app::bench::kernels(
            &config,
            &model,
            a.batch,
            a.prompt_len,
            a.new_tokens,
            device,
        ))?
    };
    print_line(&line, a.json)
}

/// A bench's result: one JSON line with `--json`, else indented.
fn print_line(line: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        outln!("{line}");
    } else {
        outln!("{}", serde_json::to_string_pretty(line)?);
    }
    Ok(())
}
