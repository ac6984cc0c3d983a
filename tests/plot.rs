//! The figures: files written, panels and labels present, bad input named.

use std::path::PathBuf;

use med_rlvr::plot;

fn metrics_line(step: usize) -> String {
    let s = step as f64;
    format!(
        r#"{{"step":{step},"reward_mean":{r},"format_rate":{f},"accuracy":{a},"response_len_mean":{l},"think_len_mean":5.0,"kl":{k},"entropy":0.3,"clip_frac":0.01,"explained_var":0.1,"stages":{{"format_failure":{ff},"concise_structurer":{cs}}}{ev}}}"#,
        r = -1.0 + s / 10.0,
        f = s / 20.0,
        a = s / 40.0,
        l = 10.0 + s,
        k = 0.01 * s,
        ff = 20 - step,
        cs = step,
        ev = if step.is_multiple_of(5) {
            format!(
                r#","eval_accuracy":{},"eval_format_rate":{}"#,
                s / 40.0,
                s / 20.0
            )
        } else {
            String::new()
        }
    )
}

#[test]
fn training_figure_has_every_panel() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..=20).map(metrics_line).collect();
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
    let files = plot::training_figures(dir.path(), dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    // The PNG: 1600×760, a 4×2 grid of panels, each with its series (or stage bands) drawn in
    // the palette's colours; axes, grid and text are black, grey or white.
    let decoder = png::Decoder::new(std::fs::File::open(&files[0]).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1600, 760));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    const SERIES: [[u8; 3]; 7] = [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
    ];
    let drawn = |x0: usize, y0: usize| {
        let mut n = 0;
        for y in y0..y0 + 380 {
            for x in x0..x0 + 400 {
                let p = &pixels[(y * 1600 + x) * 3..][..3];
                let near = |c: &[u8; 3]| p.iter().zip(c).all(|(a, b)| a.abs_diff(*b) <= 8);
                n += usize::from(SERIES.iter().any(near));
            }
        }
        n
    };
    for row in 0..2 {
        for col in 0..4 {
            let n = drawn(col * 400, row * 380);
            assert!(
                n >= 300,
                "panel ({row}, {col}): {n} pixels in series colours"
            );
        }
    }
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    for title in [
        "mean reward",
        "format rate",
        "accuracy",
        "length",
        "KL to reference",
        "entropy",
        "stage shares",
        "held-out (greedy)",
        "format failure",
        "concise structurer",
    ] {
        assert!(svg.contains(title), "SVG lacks {title:?}");
    }
    // 7 line panels (9 series) + 6 stacked stage bands.
    assert!(svg.matches("<polyline").count() >= 9);
    assert!(svg.matches("<polygon").count() >= 6);
}

#[test]
fn eval_figure_has_a_bar_per_model_and_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let summary = |model: &str, a: f64| {
        serde_json::json!({"model": model, "datasets": [
            {"name": "medqa", "overall": {"accuracy": a, "accuracy_std": 0.02}},
            {"name": "mmlu_pro_health", "overall": {"accuracy": a / 2.0, "accuracy_std": 0.03}},
        ]})
    };
    let p1 = dir.path().join("a.json");
    let p2 = dir.path().join("b.json");
    std::fs::write(&p1, summary("base", 0.40).to_string()).unwrap();
    std::fs::write(&p2, summary("ppo", 0.55).to_string()).unwrap();
    let files = plot::eval_figures(&[p1, p2], dir.path()).unwrap();
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    for label in [
        "base",
        "ppo",
        "medqa",
        "mmlu_pro_health",
        "40.0",
        "55.0",
        "20.0",
        "27.5",
    ] {
        assert!(svg.contains(label), "SVG lacks {label:?}");
    }
}

#[test]
fn bad_input_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("metrics.jsonl");
    std::fs::write(&m, format!("{}\nnot json\n", metrics_line(0))).unwrap();
    let err = format!("{:#}", plot::training_figures(&m, dir.path()).unwrap_err());
    assert!(err.contains("metrics.jsonl:2"), "{err}");
    let s = dir.path().join("summary.json");
    std::fs::write(&s, r#"{"model":"x","datasets":[{"name":"d"}]}"#).unwrap();
    let err = format!("{:#}", plot::eval_figures(&[s], dir.path()).unwrap_err());
    assert!(err.contains("datasets[0]"), "{err}");
    let missing = PathBuf::from("/nonexistent/metrics.jsonl");
    assert!(plot::training_figures(&missing, dir.path()).is_err());
}
