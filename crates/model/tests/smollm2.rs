//! The embedded model with the real SmolLM2-135M-Instruct GGUF (`scripts/fetch-model.sh`, which
//! `make test` runs; or set `STIPEND_MODEL_GGUF`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stipend_model::{
    ChatMessage, EmbeddedModel, Event, FinishReason, Generate, LoadOptions, ModelError, Sampling,
    collect,
};

fn gguf() -> PathBuf {
    let path = std::env::var_os("STIPEND_MODEL_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
            ))
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh (make test does)",
        path.display()
    );
    path
}

fn load() -> EmbeddedModel {
    EmbeddedModel::load(&gguf(), LoadOptions::default()).unwrap()
}

fn greedy(prompt: String, max_tokens: usize, stop: &[&str]) -> Generate {
    Generate {
        prompt,
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        sampling: Sampling {
            temperature: 0.0,
            ..Sampling::default()
        },
    }
}

fn france(model: &EmbeddedModel) -> String {
    model
        .render_chat(&[ChatMessage {
            role: "user".to_string(),
            content: "What is the capital of France? Answer in one sentence.".to_string(),
        }])
        .unwrap()
}

#[test]
fn it_answers_paris_with_exact_token_counts() {
    let model = load();
    // 134.5M parameters: 1 cu per token by the default price.
    assert!(
        (130_000_000..140_000_000).contains(&model.info().params),
        "{:?}",
        model.info()
    );
    let prompt = france(&model);
    // The model's own template, with its default system message.
    assert!(
        prompt.contains("You are a helpful AI assistant named SmolLM"),
        "{prompt:?}"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let (text, prompt_tokens, completion_tokens, finish) =
        collect(model.generate(greedy(prompt.clone(), 64, &[])).unwrap()).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(prompt_tokens, model.count_tokens(&prompt).unwrap());
    assert_eq!(
        completion_tokens,
        model.count_tokens(&text).unwrap(),
        "{text:?}"
    );
    // Greedy is deterministic.
    let again = collect(model.generate(greedy(prompt, 64, &[])).unwrap()).unwrap();
    assert_eq!(again.0, text);
}

#[test]
fn max_tokens_and_stop_sequences_end_it() {
    let model = load();
    let prompt = france(&model);
    let (text, _, completion_tokens, finish) =
        collect(model.generate(greedy(prompt.clone(), 3, &[])).unwrap()).unwrap();
    assert_eq!(
        (completion_tokens, finish),
        (3, FinishReason::Length),
        "{text:?}"
    );
    let (full, ..) = collect(model.generate(greedy(prompt.clone(), 64, &[])).unwrap()).unwrap();
    let at = full.find("Paris").expect("the greedy answer names Paris");
    let (text, _, _, finish) =
        collect(model.generate(greedy(prompt, 64, &["Paris"])).unwrap()).unwrap();
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(text, full[..at], "the answer ends before the stop sequence");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_and_the_model_keeps_serving() {
    let model = EmbeddedModel::load(
        &gguf(),
        LoadOptions {
            n_ctx: 128,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let long = "Tell me everything about France. ".repeat(40);
    let error = collect(model.generate(greedy(long, 16, &[])).unwrap()).unwrap_err();
    assert!(
        matches!(error, ModelError::ContextLengthExceeded { n_ctx: 128, .. }),
        "{error:?}"
    );
    // A prompt that fits, but not with the completion asked for.
    let prompt = france(&model);
    let error = collect(model.generate(greedy(prompt.clone(), 120, &[])).unwrap()).unwrap_err();
    assert!(
        matches!(error, ModelError::ContextLengthExceeded { .. }),
        "{error:?}"
    );
    let (text, ..) = collect(model.generate(greedy(prompt, 32, &[])).unwrap()).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    // Bad parameters are refused before any work.
    assert!(matches!(
        model.generate(greedy("x".into(), 0, &[])),
        Err(ModelError::Invalid { .. })
    ));
    assert!(matches!(
        model.generate(greedy("x".into(), 1, &["a", "b", "c", "d", "e"])),
        Err(ModelError::Invalid { .. })
    ));
}

#[test]
fn a_listener_that_leaves_stops_the_generation() {
    let model = load();
    let prompt = model
        .render_chat(&[ChatMessage {
            role: "user".to_string(),
            content: "Write a very long story about a lighthouse keeper.".to_string(),
        }])
        .unwrap();
    let events = model.generate(greedy(prompt.clone(), 2_000, &[])).unwrap();
    // Take a few pieces, then leave.
    let mut pieces = 0;
    for event in &events {
        if let Event::Text(_) = event {
            pieces += 1;
            if pieces == 3 {
                break;
            }
        }
    }
    drop(events);
    // The worker is free at once: a short request is answered well before 2000 tokens could be.
    let started = Instant::now();
    let (text, ..) = collect(model.generate(greedy(france(&model), 32, &[])).unwrap()).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
