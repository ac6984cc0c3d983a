//! The wgpu binary (runs in `make test-wgpu`; the names start with `wgpu::`).
//!
//! It refuses a bf16 base (WGSL has no bf16) naming the setting and what to do, rather than
//! failing inside the runtime.
//!
//! It replays no autotune choice made under another adapter (issue 24,
//! `benches/upstream-cubecl-autotune.md`): lavapipe's subgroup width follows
//! `LP_NATIVE_VECTOR_WIDTH`, and cubecl's persistent cache is keyed by device index only, so
//! `generate` at width 128 and then at width 256, sharing every folder cubecl could cache in (the
//! working folder, `XDG_CACHE_HOME`), used to panic in the second run ("Should run when selected
//! by autotune … must be a multiple of plane size 8"). Both must succeed, with the same tokens.
#![cfg(feature = "wgpu")]

mod wgpu {
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn a_bf16_base_is_refused_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let train = Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
            .args(["train", "--quiet", "--out"])
            .arg(dir.path().join("run"))
            .args(["--set", "model.base_dtype=\"bf16\"", "--set", "lora.rank=4"])
            .output()
            .unwrap();
        let bench = Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
            .args(["bench", "--dtype", "bf16", "--new-tokens", "2", "--config"])
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/qwen2/untied-f32-mha/config.json"),
            )
            .output()
            .unwrap();
        for (o, says) in [
            (
                train,
                "model.base_dtype = \"bf16\": this backend has no bf16 tensors",
            ),
            (bench, "--dtype bf16: this backend has no bf16 tensors"),
        ] {
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains(says), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }

    #[test]
    fn autotune_choices_do_not_cross_adapter_widths() {
        let dir = tempfile::tempdir().unwrap();
        let model =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2/untied-f32-mha");
        let mut tokens = Vec::new();
        for width in ["128", "256"] {
            let o = Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
                .args(["generate", "--model"])
                .arg(&model)
                .args(["--prompt", "The", "--max-new-tokens", "48", "--json"])
                .current_dir(dir.path())
                .env("XDG_CACHE_HOME", dir.path().join("xdg"))
                .env("LP_NATIVE_VECTOR_WIDTH", width)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "width {width}: {stderr}");
            let line: serde_json::Value =
                serde_json::from_slice(o.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
            tokens.push(line["output_ids"].clone());
        }
        assert_eq!(tokens[0], tokens[1], "greedy tokens differ between widths");
    }
}
