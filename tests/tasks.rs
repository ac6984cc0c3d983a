//! Loaders, prompt bytes, and real MedQA / MMLU-Pro data: slices committed in
//! `tests/fixtures/data` on every run, the full files when `MEDRLVR_DATA_DIR` names their folder
//! (a named folder that is missing fails the test).

use std::path::{Path, PathBuf};

use med_rlvr::prompt::{self, PromptStyle};
use med_rlvr::task::{self, DataFormat, LoadOptions, McqaItem};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const MEDQA: &str = r#"{"question": "Q1?", "answer": "Aspirin", "options": {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "None", "E": "Both"}, "meta_info": "step1", "answer_idx": "A"}
{"question": "Q2?", "answer": "Heparin", "options": {"A": "Aspirin", "B": "Heparin"}, "meta_info": "step2&3", "answer_idx": "B"}
"#;

#[test]
fn medqa_any_number_of_options_and_none_of_the_above() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "m.jsonl", MEDQA);
    let ds = task::load(&p, DataFormat::Auto, &LoadOptions::default()).unwrap();
    assert_eq!(ds.items.len(), 2);
    assert_eq!(ds.items[0].options.len(), 5);
    assert_eq!(ds.items[1].options.len(), 2);
    assert_eq!((ds.items[0].answer, ds.items[1].answer), ('A', 'B'));
    assert_eq!(ds.items[1].category.as_deref(), Some("step2&3"));
    let opts = LoadOptions {
        none_of_the_above: true,
        ..Default::default()
    };
    let ds = task::load(&p, DataFormat::Medqa, &opts).unwrap();
    assert_eq!(ds.items[0].options.len(), 6);
    assert_eq!(ds.items[0].options[5], task::NONE_OF_THE_ABOVE);
    assert_eq!(ds.items[0].answer, 'A');
}

#[test]
fn malformed_lines_name_file_and_line_or_are_skipped_and_counted() {
    let d = tempfile::tempdir().unwrap();
    let bad_json = format!("{MEDQA}{{not json\n");
    let bad_gold = MEDQA.replace("\"answer_idx\": \"B\"", "\"answer_idx\": \"F\"");
    let empty = r#"{"question": "Q", "options": [], "answer": "A"}"#.to_string() + "\n";
    let cases = [
        (
            "badjson.jsonl",
            bad_json.as_str(),
            DataFormat::Medqa,
            "badjson.jsonl:3",
            "invalid JSON",
        ),
        (
            "badgold.jsonl",
            bad_gold.as_str(),
            DataFormat::Medqa,
            "badgold.jsonl:2",
            "not one of the option letters",
        ),
        (
            "empty.jsonl",
            empty.as_str(),
            DataFormat::Generic,
            "empty.jsonl:1",
            "no options",
        ),
    ];
    for (name, text, fmt, at, why) in cases {
        let p = write(d.path(), name, text);
        let e = format!(
            "{:#}",
            task::load(&p, fmt, &LoadOptions::default()).unwrap_err()
        );
        assert!(e.contains(at) && e.contains(why), "{e}");
        let opts = LoadOptions {
            skip_invalid: true,
            ..Default::default()
        };
        let ds = task::load(&p, fmt, &opts).unwrap();
        assert_eq!(ds.skipped.len(), 1, "{name}");
    }
}

#[test]
fn mmlu_pro_jsonl_with_category_filter_and_generic() {
    let d = tempfile::tempdir().unwrap();
    let text = r#"{"question_id": 1, "question": "Q?", "options": ["a", "b", "c"], "answer": "C", "answer_index": 2, "category": "health", "src": "x"}
{"question_id": 2, "question": "Q?", "options": ["a", "b"], "answer": "A", "answer_index": 0, "category": "law", "src": "y"}
"#;
    let p = write(d.path(), "p.jsonl", text);
    let opts = LoadOptions {
        category: Some("health".into()),
        ..Default::default()
    };
    let ds = task::load(&p, DataFormat::Auto, &opts).unwrap();
    assert_eq!(ds.items.len(), 1);
    assert_eq!((ds.items[0].id.as_str(), ds.items[0].answer), ("1", 'C'));
    let g = write(
        d.path(),
        "g.jsonl",
        "{\"question\": \"Q\", \"options\": [\"x\", \"y\"], \"answer\": 1}\n",
    );
    let ds = task::load(&g, DataFormat::Auto, &LoadOptions::default()).unwrap();
    assert_eq!(ds.items[0].answer, 'B');
    let bad = write(
        d.path(),
        "b.jsonl",
        text.replace("\"answer_index\": 2", "\"answer_index\": 1")
            .as_str(),
    );
    let e = format!(
        "{:#}",
        task::load(&bad, DataFormat::MmluPro, &LoadOptions::default()).unwrap_err()
    );
    assert!(e.contains("b.jsonl:1") && e.contains("disagrees"), "{e}");
}

#[test]
fn prompt_bytes_are_pinned() {
    let item = McqaItem {
        id: "x".into(),
        question: "A 60-year-old man has chest pain. What is the diagnosis?".into(),
        options: vec!["Myocardial infarction".into(), "Pericarditis".into()],
        answer: 'A',
        category: None,
        source: None,
    };
    let want = "A conversation between User and Assistant. The user asks a question, and the assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>.\nUser: A 60-year-old man has chest pain. What is the diagnosis?\nAnswer with just one of the letters from the options below.\nOptions:\nA. Myocardial infarction\nB. Pericarditis\nAssistant:";
    assert_eq!(prompt::render(&item, PromptStyle::R1), want);
    let direct = "A 60-year-old man has chest pain. What is the diagnosis?\nAnswer with just one of the letters from the options below.\nOptions:\nA. Myocardial infarction\nB. Pericarditis\nAnswer:";
    assert_eq!(prompt::render(&item, PromptStyle::Direct), direct);
    assert_eq!(prompt::direct_target(&item), " A");
}

/// The committed slices of the real files (see `tests/fixtures/data/SOURCES.md`): the MedQA
/// jsonl layouts, the MMLU-Pro jsonl rows and the parquet reader, on every `cargo test`.
#[test]
fn real_data_slices_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
    let medqa = task::load(
        &dir.join("medqa_us_test.head20.jsonl"),
        DataFormat::Auto,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(medqa.items.len(), 20);
    assert!(medqa
        .items
        .iter()
        .all(|i| i.options.len() == 5 && i.gold_index() < 5));
    let four = task::load(
        &dir.join("medqa_us_4opt_test.head20.jsonl"),
        DataFormat::Auto,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(four.items.len(), 20);
    assert!(four.items.iter().all(|i| i.options.len() == 4));
    // The same questions in both layouts.
    for (a, b) in medqa.items.iter().zip(&four.items) {
        assert_eq!(a.question, b.question);
    }
    let health = task::load(
        &dir.join("mmlu_pro_health_test.head40.jsonl"),
        DataFormat::Auto,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(health.items.len(), 40);
    assert!(health
        .items
        .iter()
        .all(|i| i.category.as_deref() == Some("health") && i.gold_index() < i.options.len()));
    let validation = task::load(
        &dir.join("mmlu_pro_validation.parquet"),
        DataFormat::Auto,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(validation.items.len(), 70);
    assert!(validation
        .items
        .iter()
        .all(|i| i.gold_index() < i.options.len() && i.options.len() <= 10));
}

/// The full files, when `MEDRLVR_DATA_DIR` names their folder (the Makefile and CI set it to
/// `../shared/data`). A named folder that does not exist is a failure, not a skip.
#[test]
fn real_data_files_when_named() {
    let Some(dir) = std::env::var("MEDRLVR_DATA_DIR")
        .ok()
        .filter(|d| !d.is_empty())
    else {
        eprintln!("MEDRLVR_DATA_DIR not set: the full files are not checked (the slices are)");
        return;
    };
    let dir = PathBuf::from(dir);
    assert!(
        dir.is_dir(),
        "MEDRLVR_DATA_DIR={} is not a folder: point it at the data or unset it",
        dir.display()
    );
    let medqa = task::load(
        &dir.join("medqa_us_test.jsonl"),
        DataFormat::Medqa,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(medqa.items.len(), 1273);
    assert!(medqa
        .items
        .iter()
        .all(|i| i.options.len() == 5 && i.gold_index() < 5));
    let four = task::load(
        &dir.join("medqa_us_4opt_test.jsonl"),
        DataFormat::Auto,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(four.items.len(), 1273);
    let health = LoadOptions {
        category: Some("health".into()),
        ..Default::default()
    };
    let j = task::load(
        &dir.join("mmlu_pro_health_test.jsonl"),
        DataFormat::MmluPro,
        &health,
    )
    .unwrap();
    let p = task::load(
        &dir.join("mmlu_pro_test.parquet"),
        DataFormat::Auto,
        &health,
    )
    .unwrap();
    assert_eq!(j.items.len(), 818);
    assert_eq!(p.items.len(), 818);
    assert_eq!(j.items, p.items, "jsonl and parquet disagree");
    assert!(p
        .items
        .iter()
        .all(|i| i.gold_index() < i.options.len() && i.options.len() <= 10));
    let all = task::load(
        &dir.join("mmlu_pro_test.parquet"),
        DataFormat::MmluPro,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(all.items.len(), 12032);
}
