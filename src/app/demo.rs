//! The embedded demo: a small synthetic medical-style MCQA task and a tiny Qwen2 *pretrained* by
//! this project's own code, so `med-rlvr train` shows the paper's effect on a CPU in minutes: the
//! knowledge is in the base (from prose), and RL with the verifier's reward teaches it to use that
//! knowledge in a formatted answer.
//!
//! How `med-rlvr demo-assets` makes them (deterministic for a seed):
//! 1. **Task.** 16 (finding → diagnosis) pairs ([`FACTS`]) in four groups of four. An item reads
//!    "A 54-year-old woman presents with {finding}. Which of the following is the most likely
//!    diagnosis?" with the four diagnoses of its group as options A–D in a random order, so the
//!    letter must be read off the options. 480 training and 120 held-out items.
//! 2. **Tokenizer.** A byte-level BPE (target vocabulary 1024) trained on the corpus, plus every
//!    diagnosis and made-up name as one token (` Gout`), as a large vocabulary would have them; a
//!    space is never merged with an option letter, so `A` is one token in `A. Gout` and in
//!    `option A` ([`keep_letters_whole`]).
//! 3. **Model.** A random Qwen2 (hidden 128, 2 layers, 4 query / 2 key-value heads, MLP 256,
//!    tied embeddings).
//! 4. **Pretraining, like a base model's: language modelling on documents, every token a target**,
//!    in three phases (AdamW, batches of 32; about 32 minutes on 2 cores):
//!    - *Knowledge* (10 epochs, lr 2e-3 cosine to 2e-4): prose on the 16 task facts and 16
//!      practice facts ([`PRACTICE_FACTS`]) in several phrasings; case reports (the finding, a
//!      differential listing the four diagnoses of its group, "The most likely diagnosis is
//!      {diagnosis}."), with no question, letter or tag; practice chats under the paper's prompt
//!      on the practice facts only (30 % formatted: the think names the diagnosis and its option,
//!      "The answer is {diagnosis}, which is option {letter}."; 70 % the same sentence without
//!      tags); a few lookup documents.
//!    - *Lookup skill* (one pass, lr 1e-3): lookup documents — an exam-style question block over
//!      four names (made-up ones and diagnoses, with an unrelated question such as "Which of the
//!      following is a river?"), then "The answer is {name}, which is option {letter}." for four
//!      names drawn from the block — teach finding a named thing among lettered options (an
//!      in-context lookup), with 3 % of knowledge documents replayed. The skill forms only in one
//!      fixed layout with several statements per document.
//!    - *Widening* (one pass, lr 1e-3): the same skill in other shapes, so it carries over to the
//!      chat — lookups after a sentence of prose, under vignette-like questions, in six phrasings;
//!      lookup chats (the paper's prompt over made-up names, a reply naming one and its option,
//!      30 % with the tags); a quarter of the documents knowledge replayed.
//!
//!    The task's questions never appear in pretraining. Under the paper's prompt the base mostly
//!    answers without the tags (greedy: always; reward −1 whatever the letter), so its held-out
//!    accuracy starts at 0. RL raises the format, and with it the accuracy, because the think
//!    names the diagnosis the base knows and reads its letter off the options; the reward also
//!    sharpens that reading (in the default run's logged rollouts the letter is the named
//!    diagnosis's option in 40 % of steps 0–4, 65–90 % later).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use qwen2_burn::{save_qwen2, Qwen2, Qwen2Config, SaveDtype};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde_json::json;

use med_rlvr::config::OptimConfig;
use med_rlvr::experience::Batch;
use med_rlvr::prompt::{self, PromptStyle};
use med_rlvr::sft::{self, SftConfig};
use med_rlvr::task::McqaItem;
use med_rlvr::tokenizer::{Tokenizer, ENDOFTEXT};

/// The shipped demo assets (`assets/demo` in the source tree).
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo")
}

/// The embedded demo model: the default `--model` of `eval`, `generate`, `logprobs` and `sft`.
pub fn model_dir() -> PathBuf {
    assets_dir().join("model")
}

/// Says on stderr when a command runs on the embedded demo model or task (its default).
pub fn announce_default(what: &str, path: &Path) {
    if path.starts_with(assets_dir()) {
        eprintln!("{what}: the embedded demo, {}", path.display());
    }
}

/// The task's facts: (finding, diagnosis).
pub const FACTS: [(&str, &str); 16] = [
    (
        "crushing chest pain radiating to the left arm",
        "Myocardial infarction",
    ),
    ("polyuria, polydipsia and weight loss", "Diabetes mellitus"),
    (
        "fever, neck stiffness and photophobia",
        "Bacterial meningitis",
    ),
    ("episodic wheezing relieved by an inhaler", "Asthma"),
    (
        "heat intolerance, tremor and weight loss",
        "Hyperthyroidism",
    ),
    (
        "cold intolerance, weight gain and constipation",
        "Hypothyroidism",
    ),
    (
        "a malar rash and joint pain",
        "Systemic lupus erythematosus",
    ),
    ("a resting tremor and a shuffling gait", "Parkinson disease"),
    (
        "right lower quadrant pain with rebound tenderness",
        "Appendicitis",
    ),
    (
        "fatigue, pallor and a low ferritin",
        "Iron deficiency anemia",
    ),
    ("a sudden painful swollen big toe", "Gout"),
    (
        "unilateral leg swelling after a long flight",
        "Deep vein thrombosis",
    ),
    ("epigastric pain relieved by meals", "Duodenal ulcer"),
    (
        "painless hematuria after decades of smoking",
        "Bladder cancer",
    ),
    (
        "productive cough, fever and lobar consolidation",
        "Pneumonia",
    ),
    ("jaundice after eating fava beans", "G6PD deficiency"),
];

/// More medical facts for the base's own practice: in its prose *and* in chats under the paper's
/// prompt (the way a base model has seen some exam questions). The task's [`FACTS`] are only in prose.
pub const PRACTICE_FACTS: [(&str, &str); 16] = [
    ("a barking cough in a toddler", "Croup"),
    ("painful vesicles along one dermatome", "Herpes zoster"),
    ("silvery scaly plaques on the elbows", "Psoriasis"),
    (
        "tearing chest pain radiating to the back",
        "Aortic dissection",
    ),
    (
        "night sweats, hemoptysis and an apical cavity",
        "Tuberculosis",
    ),
    (
        "ascending weakness after a diarrheal illness",
        "Guillain-Barre syndrome",
    ),
    (
        "a fruity breath odor and deep rapid breathing",
        "Diabetic ketoacidosis",
    ),
    (
        "a painless genital ulcer with firm edges",
        "Primary syphilis",
    ),
    ("itchy wheals after a bee sting", "Urticaria"),
    (
        "flank pain radiating to the groin with hematuria",
        "Kidney stone",
    ),
    (
        "sore throat, fever and posterior cervical nodes",
        "Infectious mononucleosis",
    ),
    (
        "hours of morning stiffness in the small hand joints",
        "Rheumatoid arthritis",
    ),
    (
        "sudden painless loss of vision like a curtain",
        "Retinal detachment",
    ),
    ("daytime sleep attacks with cataplexy", "Narcolepsy"),
    ("a bull's-eye rash after a tick bite", "Lyme disease"),
    (
        "skin darkening, fatigue and low blood pressure",
        "Addison disease",
    ),
];

/// `count` synthetic task items, drawn with `rng` (module doc, step 1).
pub fn synthetic_items(count: usize, rng: &mut StdRng, id_prefix: &str) -> Vec<McqaItem> {
    vignettes(&FACTS, count, rng, id_prefix)
}

/// `count` vignette items over `facts`: a random fact, a new age and sex, and the four diagnoses of
/// its group (`facts[4g..4g+4]`) as options in a random order.
fn vignettes(
    facts: &[(&str, &str)],
    count: usize,
    rng: &mut StdRng,
    id_prefix: &str,
) -> Vec<McqaItem> {
    (0..count)
        .map(|i| {
            let f = rng.random_range(0..facts.len());
            let group = f / 4 * 4;
            let mut order: Vec<usize> = (group..group + 4).collect();
            order.shuffle(rng);
            let age = rng.random_range(18..90);
            let who = if rng.random_bool(0.5) { "woman" } else { "man" };
            McqaItem {
                id: format!("{id_prefix}-{i}"),
                question: format!(
                    "A {age}-year-old {who} presents with {}. Which of the following is the most likely diagnosis?",
                    facts[f].0
                ),
                options: order.iter().map(|&o| facts[o].1.to_string()).collect(),
                answer: McqaItem::letter(order.iter().position(|&o| o == f).unwrap_or(0)),
                category: Some("synthetic".into()),
                source: Some("med-rlvr demo".into()),
            }
        })
        .collect()
}

/// `count` distinct made-up names (three syllables, capitalised) for the lookup documents.
fn made_up_names(count: usize, rng: &mut StdRng) -> Vec<String> {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut names = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let mut s = String::new();
        for _ in 0..3 {
            s.push(C[rng.random_range(0..C.len())] as char);
            s.push(V[rng.random_range(0..V.len())] as char);
        }
        let s = format!("{}{}", s[..1].to_uppercase(), &s[1..]);
        if names.insert(s.clone()) {
            out.push(s);
        }
    }
    out
}

/// What the lookup documents ask for (the answer is arbitrary: they teach finding a name's letter).
const KINDS: [&str; 8] = [
    "river", "town", "star", "ship", "mountain", "island", "bird", "planet",
];

/// A lookup document: an exam-style question block over four made-up names, then `queries`
/// statements "The answer is {name}, which is option {letter}." about names drawn from the four
/// (with replacement, so no statement can be answered by elimination). "Which of the following is a
/// river? … Options: A. Kavoni … The answer is Debiru, which is option C. …"
fn lookup_doc(names: &[String], queries: usize, rng: &mut StdRng) -> String {
    let options = four_names(names, rng);
    let question = format!(
        "Which of the following is a {}?",
        KINDS[rng.random_range(0..KINDS.len())]
    );
    let item = McqaItem {
        options,
        ..name_item(question)
    };
    let mut doc = prompt::question_block(&item);
    for _ in 0..queries {
        let k = rng.random_range(0..4);
        doc.push_str(&format!(
            "\nThe answer is {}, which is option {}.",
            item.options[k],
            McqaItem::letter(k)
        ));
    }
    doc
}

/// Prose that states one medical fact, in one of several phrasings (no question, letter or tag).
fn fact_sentence((finding, diagnosis): (&str, &str), rng: &mut StdRng) -> String {
    let age = rng.random_range(18..90);
    let who = if rng.random_bool(0.5) { "woman" } else { "man" };
    match rng.random_range(0..5) {
        0 => format!("A {age}-year-old {who} presents with {finding}. This points to {diagnosis}."),
        1 => format!("The classic presentation of {diagnosis} is {finding}."),
        2 => format!("The most likely diagnosis in a patient with {finding} is {diagnosis}."),
        3 => format!("In {diagnosis}, patients often present with {finding}."),
        _ => format!("When a patient presents with {finding}, think of {diagnosis}."),
    }
}

/// A case report: the finding, a few unrelated sentences and a differential that lists the four
/// diagnoses of the fact's group in a random order, then "The most likely diagnosis is
/// {diagnosis}." — the diagnosis chosen among the listed ones by the finding, carried over a
/// distance, as a reply to a question with options must.
fn case_report(all: &[(&str, &str)], rng: &mut StdRng) -> String {
    let f = rng.random_range(0..all.len());
    let (finding, diagnosis) = all[f];
    let mut group: Vec<&str> = all[f / 4 * 4..f / 4 * 4 + 4].iter().map(|x| x.1).collect();
    group.shuffle(rng);
    let age = rng.random_range(18..90);
    let who = if rng.random_bool(0.5) { "woman" } else { "man" };
    let mut sentences: Vec<String> = (0..rng.random_range(1..4))
        .map(|_| {
            match rng.random_range(0..4) {
                0 => "The vital signs are within normal limits.",
                1 => "There is no relevant family history.",
                2 => "Laboratory studies are pending.",
                _ => "The physical examination is otherwise unremarkable.",
            }
            .to_string()
        })
        .collect();
    let at = rng.random_range(0..=sentences.len());
    sentences.insert(
        at,
        format!(
            "The differential includes {}, {}, {} and {}.",
            group[0], group[1], group[2], group[3]
        ),
    );
    format!(
        "A {age}-year-old {who} presents with {finding}. {} The most likely diagnosis is {diagnosis}.",
        sentences.join(" ")
    )
}

/// Share of the practice chats whose reply uses the tags.
const FORMATTED_SHARE: f64 = 0.3;

/// A practice chat: the paper's prompt on a practice item, then a reply naming the diagnosis and its
/// option — with the tags at [`FORMATTED_SHARE`], else the same sentence without them.
fn practice_chat(item: &McqaItem, rng: &mut StdRng) -> String {
    let reply = if rng.random_bool(FORMATTED_SHARE) {
        format!(
            " <think> The answer is {}, which is option {}. </think><answer> {} </answer>",
            item.gold_text(),
            item.answer,
            item.answer
        )
    } else {
        format!(
            " The answer is {}, which is option {}.",
            item.gold_text(),
            item.answer
        )
    };
    format!("{}{reply}", prompt::render(item, PromptStyle::R1))
}

const FACT_DOCS: usize = 400;
const CASE_DOCS: usize = 800;
const CHAT_DOCS: usize = 400;
/// Statements per lookup document.
const LOOKUP_QUERIES: usize = 4;
/// Lookup documents in the knowledge phase and in the lookup-skill phase.
const LOOKUP_DOCS: [usize; 2] = [800, 90_000];
/// Documents in the widening phase.
const WIDEN_DOCS: usize = 96_000;
/// Knowledge documents replayed in the lookup-skill phase (of each kind: prose, case report, chat).
const KNOWLEDGE_REPLAY: usize = 1_000;

/// The two pretraining corpora (module doc, step 4): knowledge, then the lookup skill (with the
/// knowledge replayed so it is kept), each shuffled.
fn corpora(names: &[String], rng: &mut StdRng) -> (Vec<String>, Vec<String>) {
    let all: Vec<(&str, &str)> = FACTS.iter().chain(&PRACTICE_FACTS).copied().collect();
    let knowledge_docs = |facts: usize, cases: usize, chats: usize, rng: &mut StdRng| {
        let mut docs = Vec::new();
        for _ in 0..facts {
            let s: Vec<String> = (0..4)
                .map(|_| fact_sentence(all[rng.random_range(0..all.len())], rng))
                .collect();
            docs.push(s.join(" "));
        }
        docs.extend((0..cases).map(|_| case_report(&all, rng)));
        for item in vignettes(&PRACTICE_FACTS, chats, rng, "") {
            docs.push(practice_chat(&item, rng));
        }
        docs
    };
    let mut knowledge = knowledge_docs(FACT_DOCS, CASE_DOCS, CHAT_DOCS, rng);
    let mut skill = knowledge_docs(KNOWLEDGE_REPLAY, KNOWLEDGE_REPLAY, KNOWLEDGE_REPLAY, rng);
    knowledge.extend((0..LOOKUP_DOCS[0]).map(|_| lookup_doc(names, LOOKUP_QUERIES, rng)));
    skill.extend((0..LOOKUP_DOCS[1]).map(|_| lookup_doc(names, LOOKUP_QUERIES, rng)));
    knowledge.shuffle(rng);
    skill.shuffle(rng);
    (knowledge, skill)
}

/// Phrases that tie a name to its option letter in the widened lookup documents; the first is the
/// fixed layout's.
const LOOKUP_PHRASES: [&str; 6] = [
    "The answer is {n}, which is option {l}.",
    "{n} is option {l}.",
    "We are looking for {n}, which is option {l}.",
    "So it is {n}, which is option {l}.",
    "{n} appears as option {l}.",
    "The best match is {n}, which is option {l}.",
];

/// A four-name question block over `names` (the options; no gold) with `question`.
fn name_block(names: &[String], question: String, rng: &mut StdRng) -> McqaItem {
    McqaItem {
        options: four_names(names, rng),
        ..name_item(question)
    }
}

/// Four distinct names drawn from `names`, in the order drawn.
fn four_names(names: &[String], rng: &mut StdRng) -> Vec<String> {
    let mut picks: Vec<usize> = Vec::with_capacity(4);
    while picks.len() < 4 {
        let n = rng.random_range(0..names.len());
        if !picks.contains(&n) {
            picks.push(n);
        }
    }
    picks.iter().map(|&n| names[n].clone()).collect()
}

/// An item over made-up names: `question`, no options yet, no gold (answer `A`).
fn name_item(question: String) -> McqaItem {
    McqaItem {
        id: String::new(),
        question,
        options: Vec::new(),
        answer: 'A',
        category: None,
        source: None,
    }
}

/// A lookup document widened in shape: maybe a sentence of prose first, an unrelated or a
/// vignette-like question, then 1–4 statements in varied phrasings.
fn widened_lookup_doc(names: &[String], all: &[(&str, &str)], rng: &mut StdRng) -> String {
    let vignette = rng.random_bool(0.5);
    let question = if vignette {
        let (finding, _) = all[rng.random_range(0..all.len())];
        format!(
            "A {}-year-old patient presents with {finding}. Which of the following is the most likely diagnosis?",
            rng.random_range(18..90)
        )
    } else {
        format!(
            "Which of the following is a {}?",
            KINDS[rng.random_range(0..KINDS.len())]
        )
    };
    let item = name_block(names, question, rng);
    let mut doc = String::new();
    if rng.random_bool(0.5) {
        doc.push_str(&fact_sentence(all[rng.random_range(0..all.len())], rng));
        doc.push('\n');
    }
    doc.push_str(&prompt::question_block(&item));
    for _ in 0..rng.random_range(1..=4) {
        let k = rng.random_range(0..4);
        let phrase = LOOKUP_PHRASES[rng.random_range(0..LOOKUP_PHRASES.len())];
        doc.push_str(if rng.random_bool(0.5) { "\n" } else { " " });
        doc.push_str(
            &phrase
                .replace("{n}", &item.options[k])
                .replace("{l}", &McqaItem::letter(k).to_string()),
        );
    }
    doc
}

/// A lookup chat: the paper's prompt on an unrelated question over four names, and a reply naming
/// one of them and its option (with the tags at [`FORMATTED_SHARE`]).
fn lookup_chat(names: &[String], rng: &mut StdRng) -> String {
    let question = format!(
        "Which of the following is a {}?",
        KINDS[rng.random_range(0..KINDS.len())]
    );
    let mut item = name_block(names, question, rng);
    let k = rng.random_range(0..4);
    item.answer = McqaItem::letter(k);
    let reply = if rng.random_bool(FORMATTED_SHARE) {
        format!(
            " <think> The answer is {}, which is option {}. </think><answer> {} </answer>",
            item.options[k], item.answer, item.answer
        )
    } else {
        format!(
            " The answer is {}, which is option {}.",
            item.options[k], item.answer
        )
    };
    format!("{}{reply}", prompt::render(&item, PromptStyle::R1))
}

/// `count` documents of the widening phase, each drawn at random: 10 % fixed-layout lookups, 25 %
/// widened ones, 40 % lookup chats, and the knowledge replayed (10 % case reports, 7 % prose, 8 %
/// practice chats).
fn widen_corpus(names: &[String], count: usize, rng: &mut StdRng) -> Vec<String> {
    let all: Vec<(&str, &str)> = FACTS.iter().chain(&PRACTICE_FACTS).copied().collect();
    let mut docs = Vec::with_capacity(count);
    for _ in 0..count {
        let r = rng.random_range(0..100);
        docs.push(match r {
            0..10 => lookup_doc(names, LOOKUP_QUERIES, rng),
            10..35 => widened_lookup_doc(names, &all, rng),
            35..75 => lookup_chat(names, rng),
            75..85 => case_report(&all, rng),
            85..92 => fact_sentence(all[rng.random_range(0..all.len())], rng),
            _ => {
                let item = vignettes(&PRACTICE_FACTS, 1, rng, "").remove(0);
                practice_chat(&item, rng)
            }
        });
    }
    docs
}

fn write_jsonl(path: &Path, items: &[McqaItem]) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path)
            .with_context(|| format!("{}: cannot create", path.display()))?,
    );
    for it in items {
        let line = json!({"id": it.id, "question": it.question, "options": it.options, "answer": it.answer.to_string(), "category": it.category});
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// Demo geometry.
pub fn demo_config(vocab: usize, eos: u32) -> Qwen2Config {
    Qwen2Config {
        family: qwen2_burn::Family::Qwen2,
        attention_bias: false,
        vocab_size: vocab,
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        max_position_embeddings: 1024,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: Some(eos),
        eos_token_ids: vec![eos],
        torch_dtype: Some("float32".into()),
    }
}

/// Trains the byte-level BPE on `corpus` and adds each of `words` as one token (with its leading
/// space, ` Gout`).
fn train_tokenizer(corpus: &[String], words: &[String], out: &Path) -> Result<()> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let tmp = out.with_extension("corpus.txt");
    std::fs::write(&tmp, corpus.join("\n"))?;
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(1024)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train_from_files(&mut trainer, vec![tmp.display().to_string()])
        .map_err(|e| anyhow::anyhow!("tokenizer training failed: {e}"))?;
    let added: Vec<AddedToken> = words
        .iter()
        .map(|w| AddedToken::from(format!(" {w}"), false))
        .collect();
    tok.add_tokens(&added);
    tok.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
    tok.save(out, false)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    std::fs::remove_file(&tmp)?;
    keep_letters_whole(out)
}

/// Drops the merges of a space with an option letter (`Ġ A` … `Ġ D`) from the saved tokenizer, so
/// a letter is the same token in the options (`\nA. Gout`) and in a reply (`option A`, `<answer> A`):
/// reading a letter off the options is then a copy, which a two-layer model learns in a couple of
/// thousand steps; mapping `A` to a different token ` A` it did not learn in 3,000 (measured on a
/// synthetic lookup task).
fn keep_letters_whole(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut json: serde_json::Value = serde_json::from_str(&text)?;
    let merges = json["model"]["merges"]
        .as_array_mut()
        .with_context(|| format!("{}: no model.merges", path.display()))?;
    merges.retain(|m| {
        let pair: Vec<&str> = m.as_array().map_or(Vec::new(), |p| {
            p.iter().filter_map(|x| x.as_str()).collect()
        });
        !(pair.len() == 2 && pair[0] == "\u{120}" && ["A", "B", "C", "D"].contains(&pair[1]))
    });
    std::fs::write(path, serde_json::to_string(&json)?)?;
    Ok(())
}

/// For each `(prefix, candidates)`, the index of the candidate continuation with the highest
/// total log-probability under `model`.
fn best_choices<B: Backend>(
    model: &Qwen2<B>,
    tok: &Tokenizer,
    cases: &[(String, Vec<String>)],
    device: &B::Device,
) -> Result<Vec<usize>> {
    let mut rows = Vec::new();
    for (prefix, cands) in cases {
        let p = tok.encode(prefix)?;
        for c in cands {
            rows.push((p.clone(), tok.encode(c)?));
        }
    }
    let mut scores = Vec::with_capacity(rows.len());
    for group in rows.chunks(32) {
        let refs: Vec<(&[u32], &[u32])> = group.iter().map(|(p, r)| (&p[..], &r[..])).collect();
        let batch = Batch::new(&refs);
        let lp: Vec<f64> = batch
            .logprobs(model, 64, device)
            .into_data()
            .iter::<f64>()
            .collect();
        let r = batch.mask[0].len();
        for (i, m) in batch.mask.iter().enumerate() {
            scores.push((0..r).map(|j| lp[i * r + j] * m[j]).sum::<f64>());
        }
    }
    let mut out = Vec::with_capacity(cases.len());
    let mut at = 0;
    for (_, cands) in cases {
        let s = &scores[at..at + cands.len()];
        at += cands.len();
        let best = (0..s.len())
            .max_by(|&a, &b| s[a].total_cmp(&s[b]))
            .unwrap_or(0);
        out.push(best);
    }
    Ok(out)
}

/// What the base knows, teacher-forced on `items` under the paper's prompt: the share whose think
/// would name the gold diagnosis (among the four options) after "<think> The answer is", and the
/// share whose letter after "…{gold}, which is option" is right; plus the lookup accuracy
/// on fresh lookup documents.
fn probe<B: Backend>(
    model: &Qwen2<B>,
    tok: &Tokenizer,
    items: &[McqaItem],
    lookups: &[String],
    device: &B::Device,
) -> Result<(f64, f64, f64)> {
    let letters: Vec<String> = (0..4)
        .map(|i| format!(" {}", McqaItem::letter(i)))
        .collect();
    let head = |it: &McqaItem| {
        format!(
            "{} <think> The answer is",
            prompt::render(it, PromptStyle::R1)
        )
    };
    let names: Vec<(String, Vec<String>)> = items
        .iter()
        .map(|it| {
            (
                head(it),
                it.options.iter().map(|o| format!(" {o}")).collect(),
            )
        })
        .collect();
    let lookup: Vec<(String, Vec<String>)> = items
        .iter()
        .map(|it| {
            (
                format!("{} {}, which is option", head(it), it.gold_text()),
                letters.clone(),
            )
        })
        .collect();
    let docs: Vec<(String, Vec<String>)> = lookups
        .iter()
        .map(|d| (d[..d.len() - 3].to_string(), letters.clone()))
        .collect();
    let share = |picks: Vec<usize>, gold: Vec<usize>| {
        picks.iter().zip(&gold).filter(|(a, b)| a == b).count() as f64 / gold.len().max(1) as f64
    };
    let gold: Vec<usize> = items.iter().map(|it| it.gold_index()).collect();
    let doc_gold: Vec<usize> = lookups
        .iter()
        .map(|d| (d.as_bytes()[d.len() - 2] - b'A') as usize)
        .collect();
    Ok((
        share(best_choices(model, tok, &names, device)?, gold.clone()),
        share(best_choices(model, tok, &lookup, device)?, gold),
        share(best_choices(model, tok, &docs, device)?, doc_gold),
    ))
}

/// Pretraining settings for one phase: AdamW without weight decay, batches of 32 grouped by
/// length, the learning rate warmed up over 3 % of the steps, then cosine down to `min_lr_ratio` of
/// its peak (1 = constant).
fn phase_config(epochs: usize, lr: f64, min_lr_ratio: f64, seed: u64) -> SftConfig {
    SftConfig {
        epochs,
        batch: 32,
        lr,
        optim: OptimConfig {
            weight_decay: 0.0,
            min_lr_ratio,
            ..OptimConfig::default()
        },
        seed,
        logprob_chunk: 64,
        group_by_length: true,
    }
}

/// Language-model pretraining on `docs`: every token a target, after the start token.
fn pretrain<B: AutodiffBackend>(
    model: Qwen2<B>,
    tok: &Tokenizer,
    docs: &[String],
    cfg: &SftConfig,
    what: &str,
    device: &B::Device,
) -> Result<Qwen2<B>> {
    let eos = tok.eos_id()?;
    let pairs = docs
        .iter()
        .map(|d| {
            let mut target = tok.encode(d)?;
            target.push(eos);
            Ok((vec![eos], target))
        })
        .collect::<Result<Vec<_>>>()?;
    let (model, hist) = sft::train(model, &pairs, cfg, device, |s| {
        if s.step % 25 == 0 {
            eprintln!(
                "{what} step {:4}  epoch {}  loss {:.4}",
                s.step, s.epoch, s.loss
            );
        }
    })?;
    eprintln!(
        "{what} done: {} steps, final loss {:.4}",
        hist.len(),
        hist.last().map_or(f64::NAN, |s| s.loss)
    );
    Ok(model)
}

/// The demo task written by [`write_task`], and what pretraining reads after it.
pub struct DemoTask {
    pub tok: Tokenizer,
    test: Vec<McqaItem>,
    names: Vec<String>,
    knowledge: Vec<String>,
    skill: Vec<String>,
    probes: Vec<String>,
    rng: StdRng,
}

/// Writes the demo's data and tokenizer into `out` (`train.jsonl`, `test.jsonl`,
/// `model/tokenizer.json`): a function of `seed` alone (the committed `assets/demo` files are
/// seed 0's), drawn before any training so no kernel's rounding can change them.
pub fn write_task(out: &Path, seed: u64) -> Result<DemoTask> {
    let mut rng = StdRng::seed_from_u64(seed);
    let train = synthetic_items(480, &mut rng, "train");
    let test = synthetic_items(120, &mut rng, "test");
    std::fs::create_dir_all(out.join("model"))?;
    write_jsonl(&out.join("train.jsonl"), &train)?;
    write_jsonl(&out.join("test.jsonl"), &test)?;
    // The lookup documents' names: made-up ones and every diagnosis (a base model has seen
    // lookups over all kinds of words; the questions are unrelated, the letters random).
    let mut names = made_up_names(400, &mut rng);
    names.extend(FACTS.iter().chain(&PRACTICE_FACTS).map(|f| f.1.to_string()));
    let (knowledge, skill) = corpora(&names, &mut rng);
    let probes: Vec<String> = (0..200)
        .map(|_| lookup_doc(&names[..400], 1, &mut rng))
        .collect();
    let mut tok_corpus = skill.clone();
    tok_corpus.extend(knowledge.iter().cloned());
    tok_corpus.extend(train.iter().map(|it| prompt::render(it, PromptStyle::R1)));
    train_tokenizer(&tok_corpus, &names, &out.join("model/tokenizer.json"))?;
    let tok = Tokenizer::from_dir(&out.join("model"))?;
    Ok(DemoTask {
        tok,
        test,
        names,
        knowledge,
        skill,
        probes,
        rng,
    })
}

/// Builds the demo task and model into `out` (`train.jsonl`, `test.jsonl`, `model/`): the task
/// ([`write_task`]), then a random model pretrained in three phases.
pub fn build<B: AutodiffBackend>(
    out: &Path,
    seed: u64,
    epochs: usize,
    device: &B::Device,
) -> Result<()> {
    let mut task = write_task(out, seed)?;
    let tok = &task.tok;
    let config = demo_config(tok.vocab_size(), tok.eos_id()?);
    let model = Qwen2::<B>::init_random(&config, seed, device);
    let model = pretrain(
        model,
        tok,
        &task.knowledge,
        &phase_config(epochs, 2e-3, 0.1, seed + 1),
        "knowledge",
        device,
    )?;
    let (d, l, k) = probe(&model.valid(), tok, &task.test, &task.probes, device)?;
    eprintln!("after the knowledge phase: lookup {k:.3}; task: diagnosis {d:.3}, letter {l:.3}");
    let model = pretrain(
        model,
        tok,
        &task.skill,
        &phase_config(1, 1e-3, 1.0, seed),
        "lookup skill",
        device,
    )?;
    let (d, l, k) = probe(&model.valid(), tok, &task.test, &task.probes, device)?;
    eprintln!("after the skill phase: lookup {k:.3}; task: diagnosis {d:.3}, letter {l:.3}");
    let widen = widen_corpus(&task.names, WIDEN_DOCS, &mut task.rng);
    let model = pretrain(
        model,
        tok,
        &widen,
        &phase_config(1, 1e-3, 1.0, seed + 2),
        "widen",
        device,
    )?;
    let (d, l, k) = probe(&model.valid(), tok, &task.test, &task.probes, device)?;
    eprintln!("after the widening phase: lookup {k:.3}; task: diagnosis {d:.3}, letter {l:.3}");
    save_qwen2(
        &model.valid(),
        &config,
        &out.join("model"),
        SaveDtype::F32,
        usize::MAX,
    )?;
    Ok(())
}
