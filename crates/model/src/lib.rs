//! The embedded model: a GGUF file run in-process through llama.cpp (the `llama-cpp-2` crate).
//!
//! One worker thread owns the model and its context; requests reach it over a bounded channel
//! and their output comes back, piece by piece, over a channel of their own. A request whose
//! receiver is dropped (the client left) stops at its next token, so its capacity frees at once.
//!
//! The chat template is the GGUF's own `tokenizer.chat_template`, rendered with minijinja:
//! llama.cpp's built-in template engine drops this model family's default system message.
//! Every length is checked before every decode, because llama.cpp aborts the whole process when a
//! batch exceeds `n_batch` or a position exceeds `n_ctx`. Token pieces are bytes; text is emitted
//! only up to the last complete UTF-8 character.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

/// The most requests waiting for the worker.
pub const QUEUE_MAX: usize = 256;
/// The most stop sequences.
pub const STOP_SEQUENCES_MAX: usize = 4;

/// Why the model could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The file could not be loaded.
    #[error("cannot load the model {path}: {reason}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The chat template is missing or does not render.
    #[error("the model's chat template failed: {0}")]
    Template(String),
    /// The prompt and the completion asked for do not fit the context.
    #[error(
        "this model's context is {n_ctx} tokens; the prompt has {prompt_tokens} and max_tokens asks for {max_tokens} more"
    )]
    ContextLengthExceeded {
        /// The context size.
        n_ctx: u32,
        /// The prompt's tokens.
        prompt_tokens: usize,
        /// The completion asked for.
        max_tokens: usize,
    },
    /// A request parameter is out of range.
    #[error("invalid {param}: {reason}")]
    Invalid {
        /// Which.
        param: &'static str,
        /// Why.
        reason: String,
    },
    /// The worker is at capacity.
    #[error("the model is at capacity; try again shortly")]
    Busy,
    /// llama.cpp failed mid-generation, or the worker is gone.
    #[error("the model failed: {0}")]
    Failed(String),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// system, user, assistant, …
    pub role: String,
    /// The text.
    pub content: String,
}

/// How to sample, as the OpenAI API defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling; 1 keeps everything.
    pub top_p: f32,
    /// For reproducible sampling at temperature > 0.
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A generation request: a rendered prompt and its limits.
#[derive(Debug, Clone)]
pub struct Generate {
    /// The prompt (already rendered through the chat template, for chats).
    pub prompt: String,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Stop sequences (at most [`STOP_SEQUENCES_MAX`]); the answer ends before the first found.
    pub stop: Vec<String>,
    /// How to sample.
    pub sampling: Sampling,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended it, or a stop sequence did.
    Stop,
    /// `max_tokens` did.
    Length,
}

/// What a generation sends back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt was read: its exact token count.
    Started {
        /// Prompt tokens, counted by the model's own tokenizer.
        prompt_tokens: usize,
    },
    /// More text (complete UTF-8, never past a stop sequence).
    Text(String),
    /// The end.
    Done {
        /// Completion tokens generated (a stop sequence's tokens included: they were computed).
        completion_tokens: usize,
        /// Why it ended.
        finish: FinishReason,
    },
    /// It failed; nothing more follows.
    Failed(ModelError),
}

/// Facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The file.
    pub path: PathBuf,
    /// Its parameter count, read from the GGUF.
    pub params: u64,
    /// The context size requests share.
    pub n_ctx: u32,
}

/// Options for loading.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The context size (prompt + completion), capped at the model's training context.
    pub n_ctx: u32,
    /// The most prompt tokens decoded in one batch.
    pub n_batch: u32,
    /// CPU threads.
    pub n_threads: i32,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            n_ctx: 4_096,
            n_batch: 512,
            n_threads: std::thread::available_parallelism().map_or(2, |n| n.get() as i32),
        }
    }
}

struct Job {
    request: Generate,
    events: mpsc::Sender<Event>,
}

enum Work {
    Generate(Job),
    Count(String, mpsc::Sender<Result<usize, ModelError>>),
}

/// A loaded embedded model and its worker.
pub struct EmbeddedModel {
    info: ModelInfo,
    template: minijinja::Environment<'static>,
    work: mpsc::SyncSender<Work>,
}

fn backend() -> Result<&'static LlamaBackend, ModelError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut backend = LlamaBackend::init().map_err(|error| error.to_string())?;
            // llama.cpp's own logging would print the prompt's tokens at some levels; keep it off.
            backend.void_logs();
            Ok(backend)
        })
        .as_ref()
        .map_err(|reason| ModelError::Failed(format!("llama.cpp did not start: {reason}")))
}

impl EmbeddedModel {
    /// Loads a GGUF and starts its worker. Returns once the model is ready.
    pub fn load(path: &Path, options: LoadOptions) -> Result<EmbeddedModel, ModelError> {
        let load_error = |reason: String| ModelError::Load {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(load_error("no such file".to_string()));
        }
        let backend = backend()?;
        let (work, jobs) = mpsc::sync_channel::<Work>(QUEUE_MAX);
        let (ready, ready_rx) = mpsc::channel::<Result<(ModelInfo, String), ModelError>>();
        let file = path.to_path_buf();
        std::thread::Builder::new()
            .name("model-worker".to_string())
            .spawn(move || worker(backend, file, options, ready, jobs))
            .map_err(|error| load_error(format!("cannot start the worker: {error}")))?;
        let (info, template_source) = ready_rx
            .recv()
            .map_err(|_| load_error("the worker stopped while loading".to_string()))??;
        let mut template = minijinja::Environment::new();
        template
            .add_template_owned("chat", template_source)
            .map_err(|error| ModelError::Template(error.to_string()))?;
        Ok(EmbeddedModel {
            info,
            template,
            work,
        })
    }

    /// Facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Renders chat messages into a prompt with the model's own template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let template = self
            .template
            .get_template("chat")
            .map_err(|error| ModelError::Template(error.to_string()))?;
        template
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .map_err(|error| ModelError::Template(error.to_string()))
    }

    /// Counts a text's tokens with the model's tokenizer.
    pub fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
        let (reply, answer) = mpsc::channel();
        self.work
            .try_send(Work::Count(text.to_string(), reply))
            .map_err(|_| ModelError::Busy)?;
        answer
            .recv()
            .map_err(|_| ModelError::Failed("the worker is gone".to_string()))?
    }

    /// Starts a generation. Events arrive on the returned receiver; dropping it stops the
    /// generation at its next token.
    pub fn generate(&self, request: Generate) -> Result<mpsc::Receiver<Event>, ModelError> {
        if request.max_tokens == 0 {
            return Err(ModelError::Invalid {
                param: "max_tokens",
                reason: "must be at least 1".to_string(),
            });
        }
        if request.stop.len() > STOP_SEQUENCES_MAX || request.stop.iter().any(String::is_empty) {
            return Err(ModelError::Invalid {
                param: "stop",
                reason: format!("at most {STOP_SEQUENCES_MAX} non-empty strings"),
            });
        }
        let sampling = &request.sampling;
        if !(0.0..=2.0).contains(&sampling.temperature) || !(0.0..=1.0).contains(&sampling.top_p) {
            return Err(ModelError::Invalid {
                param: "temperature",
                reason: "temperature must be 0 to 2 and top_p 0 to 1".to_string(),
            });
        }
        let (events, receiver) = mpsc::channel();
        self.work
            .try_send(Work::Generate(Job { request, events }))
            .map_err(|_| ModelError::Busy)?;
        Ok(receiver)
    }
}

fn worker(
    backend: &'static LlamaBackend,
    path: PathBuf,
    options: LoadOptions,
    ready: mpsc::Sender<Result<(ModelInfo, String), ModelError>>,
    jobs: mpsc::Receiver<Work>,
) {
    let load_error = |reason: String| ModelError::Load {
        path: path.display().to_string(),
        reason,
    };
    let model = match LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default()) {
        Ok(model) => model,
        Err(error) => {
            let _ = ready.send(Err(load_error(error.to_string())));
            return;
        }
    };
    let template = match model.meta_val_str("tokenizer.chat_template") {
        Ok(template) => template,
        Err(error) => {
            let _ = ready.send(Err(ModelError::Template(format!(
                "the GGUF has no tokenizer.chat_template: {error}"
            ))));
            return;
        }
    };
    let n_ctx = options.n_ctx.min(model.n_ctx_train()).max(64);
    let n_batch = options.n_batch.clamp(16, n_ctx);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_threads(options.n_threads)
        .with_n_threads_batch(options.n_threads);
    let mut context = match model.new_context(backend, params) {
        Ok(context) => context,
        Err(error) => {
            let _ = ready.send(Err(load_error(error.to_string())));
            return;
        }
    };
    let info = ModelInfo {
        path: path.clone(),
        params: model.n_params(),
        n_ctx,
    };
    if ready.send(Ok((info, template))).is_err() {
        return;
    }
    while let Ok(work) = jobs.recv() {
        match work {
            Work::Count(text, reply) => {
                let tokens = model.vocab().tokenize(text.as_bytes(), false, true);
                let _ = reply.send(Ok(tokens.len()));
            }
            Work::Generate(job) => {
                if let Err(error) = run(&model, &mut context, n_ctx, n_batch, &job) {
                    let _ = job.events.send(Event::Failed(error));
                }
                context.clear_kv_cache();
            }
        }
    }
}

/// Decodes `tokens` starting at `position`, in batches of at most `n_batch`, asking for logits
/// of the last one only.
fn decode_prompt(
    context: &mut LlamaContext<'_>,
    tokens: &[LlamaToken],
    n_batch: u32,
) -> Result<LlamaBatch<'static>, ModelError> {
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    let last = tokens.len().saturating_sub(1);
    for (start, chunk) in tokens.chunks(n_batch as usize).enumerate() {
        batch.clear();
        for (offset, token) in chunk.iter().enumerate() {
            let index = start * n_batch as usize + offset;
            batch
                .add(*token, index as i32, &[0], index == last)
                .map_err(|error| ModelError::Failed(error.to_string()))?;
        }
        context
            .decode(&mut batch)
            .map_err(|error| ModelError::Failed(error.to_string()))?;
    }
    Ok(batch)
}

fn run(
    model: &LlamaModel,
    context: &mut LlamaContext<'_>,
    n_ctx: u32,
    n_batch: u32,
    job: &Job,
) -> Result<(), ModelError> {
    let request = &job.request;
    let vocab = model.vocab();
    let prompt = vocab.tokenize(request.prompt.as_bytes(), false, true);
    if prompt.is_empty() || prompt.len() + request.max_tokens > n_ctx as usize {
        return Err(ModelError::ContextLengthExceeded {
            n_ctx,
            prompt_tokens: prompt.len(),
            max_tokens: request.max_tokens,
        });
    }
    if job
        .events
        .send(Event::Started {
            prompt_tokens: prompt.len(),
        })
        .is_err()
    {
        return Ok(()); // nobody is listening any more
    }
    let mut batch = decode_prompt(context, &prompt, n_batch)?;
    let sampling = &request.sampling;
    let mut sampler = if sampling.temperature <= 0.0 {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::top_p(sampling.top_p, 1),
            LlamaSampler::temp(sampling.temperature),
            LlamaSampler::dist(sampling.seed),
        ])
    };
    let hold_chars = request
        .stop
        .iter()
        .map(|stop| stop.chars().count())
        .max()
        .unwrap_or(1)
        - 1;
    let mut bytes: Vec<u8> = Vec::new(); // generated, not yet valid UTF-8 or not yet sent
    let mut text = String::new(); // decoded, not yet sent
    let mut completion_tokens = 0usize;
    let mut position = prompt.len() as i32;
    let finish = loop {
        let token = sampler.sample(context, batch.n_tokens() - 1);
        sampler.accept(token);
        if vocab.is_eog(token) {
            break FinishReason::Stop;
        }
        completion_tokens += 1;
        bytes.extend(vocab.token_to_piece(token, false, None));
        // Hold back an incomplete UTF-8 character at the end.
        let valid = match std::str::from_utf8(&bytes) {
            Ok(all) => all.len(),
            Err(error) => error.valid_up_to(),
        };
        let decoded: Vec<u8> = bytes.drain(..valid).collect();
        text.push_str(&String::from_utf8_lossy(&decoded));
        if let Some(at) = request
            .stop
            .iter()
            .filter_map(|stop| text.find(stop.as_str()))
            .min()
        {
            text.truncate(at);
            if !text.is_empty()
                && job
                    .events
                    .send(Event::Text(std::mem::take(&mut text)))
                    .is_err()
            {
                return Ok(());
            }
            break FinishReason::Stop;
        }
        // Send all but what could still be the start of a stop sequence.
        let keep_from = text
            .char_indices()
            .rev()
            .nth(hold_chars.saturating_sub(1))
            .map_or(
                0,
                |(index, _)| if hold_chars == 0 { text.len() } else { index },
            );
        if keep_from > 0 {
            let ready: String = text.drain(..keep_from).collect();
            if job.events.send(Event::Text(ready)).is_err() {
                return Ok(()); // the client left: stop now
            }
        }
        if completion_tokens >= request.max_tokens {
            break FinishReason::Length;
        }
        if position as u32 + 1 >= n_ctx {
            break FinishReason::Length;
        }
        batch.clear();
        batch
            .add(token, position, &[0], true)
            .map_err(|error| ModelError::Failed(error.to_string()))?;
        position += 1;
        context
            .decode(&mut batch)
            .map_err(|error| ModelError::Failed(error.to_string()))?;
    };
    if !bytes.is_empty() {
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    if !text.is_empty() && job.events.send(Event::Text(text)).is_err() {
        return Ok(());
    }
    let _ = job.events.send(Event::Done {
        completion_tokens,
        finish,
    });
    Ok(())
}

/// Collects a generation into its text, prompt tokens, completion tokens and finish reason.
pub fn collect(
    events: mpsc::Receiver<Event>,
) -> Result<(String, usize, usize, FinishReason), ModelError> {
    let mut text = String::new();
    let mut prompt_tokens = 0;
    for event in events {
        match event {
            Event::Started { prompt_tokens: n } => prompt_tokens = n,
            Event::Text(piece) => text.push_str(&piece),
            Event::Done {
                completion_tokens,
                finish,
            } => return Ok((text, prompt_tokens, completion_tokens, finish)),
            Event::Failed(error) => return Err(error),
        }
    }
    Err(ModelError::Failed(
        "the generation ended without finishing".to_string(),
    ))
}
