//! Every verifier rule, one example reply per training stage, and property tests.

use med_rlvr::verifier::{extract_letter, verify, Stage, VerifierConfig};
use proptest::prelude::*;

fn permissive(reply: &str, gold: char, n: usize) -> (f32, Option<char>) {
    let v = verify(reply, gold, n, None, &VerifierConfig::default());
    (v.reward, v.extracted)
}

fn strict(reply: &str, gold: char, n: usize) -> f32 {
    verify(
        reply,
        gold,
        n,
        None,
        &VerifierConfig {
            strict: true,
            ..Default::default()
        },
    )
    .reward
}

#[test]
fn paper_reward_values() {
    assert_eq!(
        permissive("<think> x </think><answer> C </answer>", 'C', 5),
        (1.0, Some('C'))
    );
    assert_eq!(
        permissive("<think> x </think><answer> B </answer>", 'C', 5),
        (0.0, Some('B'))
    );
    assert_eq!(permissive("The answer is C.", 'C', 5).0, -1.0);
    assert_eq!(permissive("", 'C', 5).0, -1.0);
}

#[test]
fn letter_is_found_robustly() {
    for (a, want) in [
        ("C", Some('C')),
        ("(C)", Some('C')),
        ("[C]", Some('C')),
        ("C.", Some('C')),
        ("c", Some('C')),
        (" C: Cholesterol embolization ", Some('C')),
        ("C. Cholesterol embolization", Some('C')),
        ("(C) Cholesterol embolization", Some('C')),
        ("The answer is C.", Some('C')),
        ("answer: (D)", Some('D')),
        ("Option B", Some('B')),
        ("I'd pick C", Some('C')),
        ("A or C", None),
        ("Cholesterol embolization", None),
        ("F", None), // out of range for five options
        ("The answer is F", None),
    ] {
        assert_eq!(extract_letter(a, 5), want, "{a:?}");
    }
    assert_eq!(extract_letter("J", 10), Some('J'));
}

#[test]
fn permissive_semantics() {
    // Not anchored: reasoning before <think> is still rewarded (the step-by-step exploit).
    assert_eq!(
        permissive(
            "Let me reason first. <think> so C </think><answer>C</answer>",
            'C',
            5
        )
        .0,
        1.0
    );
    // No minimum think length.
    assert_eq!(
        permissive("<think></think><answer>C</answer>", 'C', 5).0,
        1.0
    );
    // Text between blocks and after </answer> is allowed.
    assert_eq!(
        permissive("<think>x</think> so <answer>C</answer> done", 'C', 5).0,
        1.0
    );
    // Several answer blocks: the first one after think counts.
    let v = verify(
        "<think>x</think><answer>B</answer><answer>C</answer>",
        'C',
        5,
        None,
        &VerifierConfig::default(),
    );
    assert_eq!((v.reward, v.diagnostics.answer_blocks), (0.0, 2));
    // Truncated: no closing </answer> → invalid.
    let v = verify(
        "<think>x</think><answer>C",
        'C',
        5,
        None,
        &VerifierConfig::default(),
    );
    assert_eq!(v.reward, -1.0);
    assert!(v.diagnostics.truncated);
    // Answer before think does not count as a think-then-answer reply.
    assert_eq!(
        permissive("<answer>C</answer><think>x</think>", 'C', 5).0,
        -1.0
    );
    // Out-of-range letter: valid but wrong.
    assert_eq!(
        permissive("<think>x</think><answer>F</answer>", 'F', 5).0,
        0.0
    );
    // Unbalanced and nested tags.
    assert_eq!(
        permissive("<think><think> a </think><answer>C</answer>", 'C', 5).0,
        1.0
    );
    assert_eq!(permissive("<think> a <answer>C</answer>", 'C', 5).0, -1.0);
}

#[test]
fn strict_mode() {
    assert_eq!(strict("<think> x </think><answer>C</answer>", 'C', 5), 1.0);
    assert_eq!(
        strict("  <think> x </think>\n<answer> C </answer>\n", 'C', 5),
        1.0
    );
    assert_eq!(
        strict("Preamble <think> x </think><answer>C</answer>", 'C', 5),
        -1.0
    );
    assert_eq!(
        strict("<think> x </think><answer>C: text</answer>", 'C', 5),
        -1.0
    );
    assert_eq!(strict("<think> x </think><answer>c</answer>", 'C', 5), -1.0);
    assert_eq!(strict("<think> x </think><answer>F</answer>", 'C', 5), -1.0);
    assert_eq!(
        strict("<think> x </think><answer>C</answer> more", 'C', 5),
        -1.0
    );
    assert_eq!(
        strict(
            "<think> x </think><answer>C</answer><answer>C</answer>",
            'C',
            5
        ),
        -1.0
    );
    assert_eq!(strict("<think> x </think><answer>B</answer>", 'C', 5), 0.0);
}

fn stage(reply: &str, gold_text: &str) -> Stage {
    verify(reply, 'C', 5, Some(gold_text), &VerifierConfig::default()).stage
}

#[test]
fn one_reply_per_stage_in_the_papers_shapes() {
    let gold = "Cholesterol embolization";
    // 1. Format failure: no tags, a brief unstructured answer.
    assert_eq!(
        stage("C. Cholesterol embolization", gold),
        Stage::FormatFailure
    );
    // 2. Verbose formatter: tags used, a very long think, the answer with its option text.
    let long = "The patient had a recent catheterization and now has renal failure, livedo reticularis and eosinophilia. ".repeat(10);
    assert_eq!(
        stage(
            &format!("<think>{long}</think><answer> C: Cholesterol embolization </answer>"),
            gold
        ),
        Stage::VerboseFormatter
    );
    // 3. Concise structurer: format followed, short reasoning.
    assert_eq!(
        stage("<think> Recent catheterization, livedo reticularis and eosinophilia point to atheroemboli. </think><answer> C </answer>", gold),
        Stage::ConciseStructurer
    );
    // 4. Direct-answer hacker: the answer stated at the start of think, think very short.
    assert_eq!(
        stage(
            "<think> The answer is C. </think><answer> C </answer>",
            gold
        ),
        Stage::DirectAnswerHacker
    );
    // 5. Step-by-step exploit: reasoning before <think>, think holds only the conclusion.
    assert_eq!(
        stage("Step 1: the patient had a catheterization. Step 2: renal failure with eosinophilia and livedo follows. Step 3: this fits atheroemboli. <think> C </think><answer> C </answer>", gold),
        Stage::StepByStepExploit
    );
    // 6. Reintegrated reasoning: reasoning back inside think, but the answer still comes first.
    assert_eq!(
        stage("<think> Cholesterol embolization is most likely. After cardiac catheterization, atheromatous plaque can shower cholesterol crystals into small arteries, which causes acute kidney injury, livedo reticularis, blue toes and a transient eosinophilia with low complement, exactly this picture. </think><answer> C </answer>", gold),
        Stage::ReintegratedReasoning
    );
}

#[test]
fn diagnostics_and_optional_penalties() {
    let reply = "one two three <think> The answer is C. </think><answer> C </answer> trailing";
    let v = verify(reply, 'C', 5, None, &VerifierConfig::default());
    assert_eq!(v.diagnostics.words_before_think, 3);
    assert_eq!(v.diagnostics.think_words, 4);
    assert!(v.diagnostics.answer_leak && v.diagnostics.text_after_answer);
    assert_eq!(v.reward, 1.0);
    let cfg = VerifierConfig {
        answer_leak_penalty: 0.5,
        preamble_penalty: 0.25,
        preamble_max_words: 2,
        ..Default::default()
    };
    assert_eq!(verify(reply, 'C', 5, None, &cfg).reward, 0.25);
    // Penalties never touch invalid replies.
    assert_eq!(verify("The answer is C", 'C', 5, None, &cfg).reward, -1.0);
}

fn tagged_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("<answer>".to_string()),
        Just("</answer>".to_string()),
        "[A-Ja-j]".prop_map(|s| s),
        "\\PC{0,12}",
        Just("The answer is ".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn never_panics_and_reward_is_in_the_set(reply in tagged_soup(), n in 1usize..=10, gold in 0u8..10, strict in any::<bool>()) {
        let gold = (b'A' + gold) as char;
        let v = verify(&reply, gold, n, Some("option text"), &VerifierConfig { strict, ..Default::default() });
        prop_assert!([-1.0, 0.0, 1.0].contains(&v.reward));
        prop_assert_eq!(v.format_ok, v.reward >= 0.0);
        if let Some(c) = v.extracted { prop_assert!(((c as u8 - b'A') as usize) < n); }
    }

    #[test]
    fn arbitrary_unicode_never_panics(reply in "\\PC*", n in 1usize..=26) {
        let v = verify(&reply, 'A', n, None, &VerifierConfig::default());
        prop_assert!([-1.0, 0.0, 1.0].contains(&v.reward));
    }
}

#[test]
fn very_long_and_deeply_nested_inputs() {
    let mb = "<think>".repeat(100_000) + &"é".repeat(200_000) + "</think><answer>C</answer>";
    assert!(mb.len() > 1_000_000);
    assert_eq!(permissive(&mb, 'C', 5).0, 1.0);
    // Contains <think> … </think> then <answer> … </answer> (valid, permissive), but no letter → 0.
    let unbalanced = "</answer><answer></think><think>".repeat(40_000);
    assert_eq!(permissive(&unbalanced, 'C', 5), (0.0, None));
    let unclosed = "<answer><think>".repeat(70_000);
    assert_eq!(permissive(&unclosed, 'C', 5).0, -1.0);
}
