//! A trainer's checkpoint: the actor (full weights, or LoRA adapters on the shared base), the
//! critic, both optimizers' state keyed by parameter name, the resolved config and the loop
//! counters (layout and atomic writes in `crate::checkpoint`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use qwen2_burn::{load_lora, load_qwen2, save_lora, save_qwen2, Qwen2, SaveDtype};

use super::{ActorRecord, CriticRecord, Trainer, ACTOR_IDS, CRITIC_IDS};
use crate::checkpoint::{self as ckpt, LoopState};
use crate::critic::Critic;
use crate::optimizer::adamw;
use crate::parallel::stable_param_ids;

impl<B: AutodiffBackend> Trainer<B> {
    /// The loop counters (which, with the seed, determine every random draw).
    pub fn loop_state(&self) -> LoopState {
        LoopState {
            format_version: ckpt::FORMAT_VERSION,
            step: self.step,
            epoch: self.epoch,
            cursor: self.cursor,
            opt_step: self.opt_step,
            kl_coef: self.kl_coef,
            bad_streak: self.bad_streak,
            seed: self.cfg.seed,
            rng: "derived: sampler row streams from (seed, step, prompt, sample); epoch shuffle \
                  from (seed, epoch); PPO mini-batch shuffle from (seed, step)"
                .into(),
        }
    }

    /// Writes a checkpoint of everything a resume needs into `RUN/checkpoints/step-…` (see
    /// `checkpoint.rs` for the layout); returns its folder.
    pub fn save_checkpoint(&self, run: &Path) -> Result<PathBuf> {
        let lora = self.cfg.lora.spec();
        ckpt::write_atomic(run, self.step, self.cfg.train.keep_checkpoints, |dir| {
            match &lora {
                Some(spec) => save_lora(
                    &self.actor,
                    spec,
                    Some(&self.cfg.model.path),
                    &dir.join("actor"),
                )?,
                None => self.save_actor(&dir.join("actor"))?,
            }
            let optim = dir.join("optimizer");
            std::fs::create_dir_all(&optim)
                .with_context(|| format!("{}: cannot create", optim.display()))?;
            ckpt::save_record::<B, ActorRecord<B>>(
                ckpt::to_stable_keys(
                    self.actor_optim.to_record(),
                    &ckpt::param_names::<B, _>(&self.actor),
                )?,
                &optim.join("actor.mpk"),
            )?;
            if let (Some(c), Some(o)) = (&self.critic, &self.critic_optim) {
                let cdir = dir.join("critic");
                match &lora {
                    Some(spec) => save_lora(&c.backbone, spec, Some(&self.cfg.model.path), &cdir)?,
                    None => save_qwen2(
                        &c.backbone.valid(),
                        &self.model_config,
                        &cdir,
                        SaveDtype::F32,
                        5 << 30,
                    )?,
                }
                c.save_head(&cdir.join("value_head.safetensors"))?;
                ckpt::save_record::<B, CriticRecord<B>>(
                    ckpt::to_stable_keys(o.to_record(), &ckpt::param_names::<B, _>(c))?,
                    &optim.join("critic.mpk"),
                )?;
            }
            let config = dir.join("config.toml");
            std::fs::write(&config, toml::to_string_pretty(&self.cfg)?)
                .with_context(|| format!("{}: cannot write", config.display()))?;
            ckpt::write_state(dir, &self.loop_state())
        })
    }

    /// A checkpoint's model folder: full weights, or (LoRA) adapters on the frozen base already
    /// in memory (shared with the reference, not read again).
    fn load_weights(&self, dir: &Path) -> Result<Qwen2<B>> {
        if self.cfg.lora.spec().is_some() {
            let base = self.actor.clone().without_lora();
            let (model, spec) = load_lora(base, dir, &self.device)?;
            if Some(&spec) != self.cfg.lora.spec().as_ref() {
                bail!(
                    "{}: adapter rank/alpha/targets differ from the config's [lora]",
                    dir.display()
                );
            }
            Ok(model)
        } else {
            if dir.join("adapter_config.json").exists() {
                bail!(
                    "{}: holds LoRA adapters but the config has lora.rank = 0",
                    dir.display()
                );
            }
            Ok(load_qwen2::<B>(dir, &self.device)?.1)
        }
    }

    /// Restores weights, optimizer state and loop counters from a checkpoint folder. The
    /// reference model stays the start model (`model.path`).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let st = ckpt::read_state(dir)?;
        let actor = stable_param_ids(self.load_weights(&dir.join("actor"))?, ACTOR_IDS);
        let file = dir.join("optimizer").join("actor.mpk");
        let rec: ActorRecord<B> = ckpt::load_record::<B, _>(&file, &self.device)?;
        let rec = ckpt::from_stable_keys(rec, &ckpt::param_names::<B, _>(&actor), &file)?;
        self.actor_optim = adamw(&self.cfg.optim).init().load_record(rec);
        self.actor = actor;
        if self.critic.is_some() {
            let cdir = dir.join("critic");
            let backbone = self.load_weights(&cdir)?;
            let critic = stable_param_ids(
                Critic::load_head(backbone, &cdir.join("value_head.safetensors"), &self.device)?,
                CRITIC_IDS,
            );
            let file = dir.join("optimizer").join("critic.mpk");
            let rec: CriticRecord<B> = ckpt::load_record::<B, _>(&file, &self.device)?;
            let rec = ckpt::from_stable_keys(rec, &ckpt::param_names::<B, _>(&critic), &file)?;
            self.critic_optim = Some(adamw(&self.cfg.optim).init().load_record(rec));
            self.critic = Some(critic);
        }
        self.epoch = st.epoch;
        self.reshuffle();
        if st.cursor > self.order.len() {
            bail!(
                "{}: data cursor {} beyond the training set ({} items): different data?",
                dir.join("state.json").display(),
                st.cursor,
                self.order.len()
            );
        }
        self.cursor = st.cursor;
        self.step = st.step;
        self.opt_step = st.opt_step;
        self.kl_coef = st.kl_coef;
        self.bad_streak = st.bad_streak;
        Ok(())
    }
}
