//! The embedded model: a GGUF file run in-process through llama.cpp (the `llama-cpp-2` crate).
//!
//! One worker thread owns the model's context, which holds several sequence *slots*; the
//! generations in those slots are decoded together, one token each per step, in one batch
//! (continuous batching): a new request joins at the next step, a finished one leaves, and its
//! slot is free at once. A long prompt is fed in chunks that share each batch with the other
//! slots' next tokens (small chunks while others generate), so it slows them down but never
//! stalls them. The slot count is the model's capacity; requests beyond it wait in a bounded
//! queue (the gateway's fair-share queue keeps it from filling).
//!
//! A slot keeps what it decoded after its generation ends (its *prefix cache*): the next
//! request whose prompt begins with the same tokens, and that may reuse them ([`PrefixCache`]),
//! is placed in that slot and decodes only the rest. A prompt that finds nothing to reuse takes
//! an empty slot, or else the free slot used least recently, whose cache it clears (an
//! eviction). The cache lives in the context's own KV memory, allocated once at load: keeping
//! it costs no memory beyond the slots'.
//!
//! Tokenizing and rendering the chat template happen on the caller's thread: the model's
//! vocabulary is read-only and shared.
//!
//! The chat template is the GGUF's own `tokenizer.chat_template`, rendered with minijinja:
//! llama.cpp's built-in template engine drops this model family's default system message.
//! Every length is checked before every decode, because llama.cpp aborts the whole process when a
//! batch exceeds `n_batch` or a position exceeds the context. Token pieces are bytes; text is
//! emitted only up to the last complete UTF-8 character.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;
use tokio::sync::mpsc as events;

/// The most requests waiting for a slot inside the worker.
pub const QUEUE_MAX: usize = 1_024;
/// The most stop sequences.
pub const STOP_SEQUENCES_MAX: usize = 4;
/// The most slots one model may have.
pub const SLOTS_MAX: u32 = 64;
/// How many recent tokens the frequency and presence penalties look at.
const PENALTY_WINDOW: i32 = 256;
/// The most prompt tokens decoded in one step while other slots are generating: a long prompt
/// then takes several short steps instead of one long one, so the streams beside it slow down
/// for a while rather than stop (a step of 512 prompt tokens takes ~1.7 s on two cores, of 128
/// about 0.4 s).
const PROMPT_TOKENS_PER_SHARED_STEP: usize = 128;

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
    /// The prompt and the completion asked for do not fit a slot's context.
    #[error(
        "this model's context is {n_ctx} tokens; the prompt has {prompt_tokens} and max_tokens asks for {max_tokens} more"
    )]
    ContextLengthExceeded {
        /// The context size of one slot.
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
    /// The worker's queue is full.
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
    /// Lowers a token's logit by this much per time it already appeared (−2 to 2).
    pub frequency_penalty: f32,
    /// Lowers a token's logit by this much if it appeared at all (−2 to 2).
    pub presence_penalty: f32,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl Sampling {
    fn check(&self) -> Result<(), ModelError> {
        let invalid = |param: &'static str, reason: &str| {
            Err(ModelError::Invalid {
                param,
                reason: reason.to_string(),
            })
        };
        if !(0.0..=2.0).contains(&self.temperature) {
            return invalid("temperature", "must be from 0 to 2");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return invalid("top_p", "must be from 0 to 1");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return invalid("frequency_penalty", "must be from -2 to 2");
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return invalid("presence_penalty", "must be from -2 to 2");
        }
        Ok(())
    }

    fn sampler(&self, n_vocab: i32, grammar: Option<LlamaSampler>) -> LlamaSampler {
        let mut chain = Vec::with_capacity(5);
        // The grammar first: the rest choose among the tokens it allows.
        chain.extend(grammar);
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                PENALTY_WINDOW,
                1.0,
                self.frequency_penalty,
                self.presence_penalty,
            ));
        }
        if self.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.push(LlamaSampler::top_p(self.top_p, 1));
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(self.seed));
        }
        LlamaSampler::chain_simple(chain)
    }
}

/// A prompt, tokenized by the model's own tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    tokens: Vec<LlamaToken>,
}

impl Prompt {
    /// Its exact token count.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Its token ids, in order.
    pub fn ids(&self) -> Vec<i32> {
        self.tokens.iter().map(|token| token.0).collect()
    }
}

/// A generation request: a tokenized prompt and its limits.
#[derive(Debug, Clone)]
pub struct Generate {
    /// The prompt (rendered through the chat template first, for chats).
    pub prompt: Prompt,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Stop sequences (at most [`STOP_SEQUENCES_MAX`]); the answer ends before the first found.
    pub stop: Vec<String>,
    /// How to sample.
    pub sampling: Sampling,
    /// A grammar (llama.cpp's GBNF, root rule `root`) every token must keep the output within:
    /// a JSON schema's, from [`EmbeddedModel::grammar_for_schema`].
    pub grammar: Option<String>,
    /// Whose request it is: under [`PrefixCache::PerOwner`] it reuses only what requests of the
    /// same owner left in the cache.
    pub owner: u64,
}

/// Whose cached prompt prefixes a request may reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrefixCache {
    /// Only its own owner's: nobody's time to first token depends on what others asked.
    #[default]
    PerOwner,
    /// Anyone's: prompts that share a long public prefix all gain, but a prompt that comes back
    /// fast tells its sender that someone sent the same beginning recently.
    Shared,
    /// None: every prompt is decoded from its first token, and a slot's cache is cleared when
    /// its generation ends.
    Off,
}

impl PrefixCache {
    /// Every mode, in the order a config's error message lists them.
    pub const ALL: [PrefixCache; 3] =
        [PrefixCache::PerOwner, PrefixCache::Shared, PrefixCache::Off];

    /// The mode's name, as a config file and `/v1/models` spell it.
    pub fn name(self) -> &'static str {
        match self {
            PrefixCache::PerOwner => "person",
            PrefixCache::Shared => "shared",
            PrefixCache::Off => "off",
        }
    }

    /// The mode a name spells, if any.
    pub fn from_name(name: &str) -> Option<PrefixCache> {
        PrefixCache::ALL
            .into_iter()
            .find(|mode| mode.name() == name)
    }
}

/// What the prefix cache has done since the model was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Generations that reused at least one cached prompt token.
    pub hits: u64,
    /// Prompt tokens read from the cache instead of decoded.
    pub cached_tokens: u64,
    /// Slots whose kept tokens were cleared to make room for a generation that could not reuse
    /// them.
    pub evictions: u64,
}

#[derive(Default)]
struct CacheCounters {
    hits: AtomicU64,
    cached_tokens: AtomicU64,
    evictions: AtomicU64,
}

/// Why a generation ended, as the OpenAI API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended it, or a stop sequence did.
    Stop,
    /// `max_tokens` did.
    Length,
}

/// Tokens a generation has computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Prompt tokens read (all of them once generation began), decoded or cached.
    pub prompt_tokens: usize,
    /// Of those, the tokens read from the prefix cache: nothing was computed for them.
    pub cached_prompt_tokens: usize,
    /// Completion tokens generated (a stop sequence's tokens included: they were computed).
    pub completion_tokens: usize,
}

/// What a generation sends back, in order: `Started`, any number of `Text`, then exactly one of
/// `Done`, `Cancelled` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A slot took the request: its prompt is being read.
    Started {
        /// Prompt tokens, counted by the model's own tokenizer.
        prompt_tokens: usize,
    },
    /// More text (complete UTF-8, never past a stop sequence).
    Text(String),
    /// The end.
    Done {
        /// What was computed.
        counts: TokenCounts,
        /// Why it ended.
        finish: FinishReason,
    },
    /// [`Generation::cancel`] stopped it.
    Cancelled {
        /// What was computed before it stopped.
        counts: TokenCounts,
    },
    /// It failed; nothing more follows.
    Failed {
        /// Why.
        error: ModelError,
        /// What was computed before it failed.
        counts: TokenCounts,
    },
}

/// A running generation: its events, and a way to stop it.
///
/// Dropping it also stops the generation at the next step, but then nobody learns what was
/// computed; [`Generation::cancel`] and reading on to the final event does.
pub struct Generation {
    events: events::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl Generation {
    /// The next event; `None` after the final one.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the thread (not for async code).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    /// Asks the worker to stop this generation at its next step; a `Cancelled` event (or the
    /// final event it had already reached) follows.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }
}

/// Facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The file.
    pub path: PathBuf,
    /// Its parameter count, read from the GGUF.
    pub params: u64,
    /// The context of one slot: the most prompt + completion tokens of one request.
    pub n_ctx: u32,
    /// How many generations are decoded together.
    pub slots: u32,
    /// Whose cached prefixes a request may reuse.
    pub prefix_cache: PrefixCache,
}

/// Options for loading.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The context of one slot (prompt + completion), capped at the model's training context.
    pub n_ctx: u32,
    /// How many generations are decoded together; each has its own `n_ctx`.
    pub slots: u32,
    /// The most tokens decoded in one batch (all slots together).
    pub n_batch: u32,
    /// CPU threads.
    pub n_threads: i32,
    /// Whose cached prefixes a request may reuse.
    pub prefix_cache: PrefixCache,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            n_ctx: 2_048,
            slots: 8,
            n_batch: 512,
            n_threads: std::thread::available_parallelism().map_or(2, |n| n.get() as i32),
            prefix_cache: PrefixCache::default(),
        }
    }
}

struct Job {
    request: Generate,
    events: events::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Job {
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Acquire) || self.events.is_closed()
    }
}

/// A loaded embedded model and its worker. Dropping it stops the worker once the generations in
/// flight are done.
pub struct EmbeddedModel {
    info: ModelInfo,
    model: Arc<LlamaModel>,
    template: minijinja::Environment<'static>,
    work: mpsc::SyncSender<Job>,
    busy: Arc<AtomicUsize>,
    cache: Arc<CacheCounters>,
}

/// llama.cpp's backend, started once per process (llama.cpp allows no second start): for code
/// that uses llama.cpp directly beside the embedded model, such as the benchmark's raw loop.
pub fn backend() -> Result<&'static LlamaBackend, ModelError> {
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
        if !(1..=SLOTS_MAX).contains(&options.slots) {
            return Err(load_error(format!("slots must be from 1 to {SLOTS_MAX}")));
        }
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|error| load_error(error.to_string()))?;
        let model = Arc::new(model);
        let template_source = model
            .meta_val_str("tokenizer.chat_template")
            .map_err(|error| {
                ModelError::Template(format!("the GGUF has no tokenizer.chat_template: {error}"))
            })?;
        let mut template = minijinja::Environment::new();
        template
            .add_template_owned("chat", template_source)
            .map_err(|error| ModelError::Template(error.to_string()))?;
        let (work, jobs) = mpsc::sync_channel::<Job>(QUEUE_MAX);
        let (ready, ready_rx) = mpsc::channel::<Result<u32, ModelError>>();
        let busy = Arc::new(AtomicUsize::new(0));
        let cache = Arc::new(CacheCounters::default());
        let (slots, prefix_cache) = (options.slots, options.prefix_cache);
        let worker_model = Arc::clone(&model);
        let worker_busy = Arc::clone(&busy);
        let worker_cache = Arc::clone(&cache);
        std::thread::Builder::new()
            .name("model-worker".to_string())
            .spawn(move || {
                let shared = Shared {
                    busy: &worker_busy,
                    cache: &worker_cache,
                };
                worker(backend, &worker_model, options, ready, jobs, shared)
            })
            .map_err(|error| load_error(format!("cannot start the worker: {error}")))?;
        let n_ctx = ready_rx
            .recv()
            .map_err(|_| load_error("the worker stopped while loading".to_string()))??;
        let info = ModelInfo {
            path: path.to_path_buf(),
            params: model.n_params(),
            n_ctx,
            slots,
            prefix_cache,
        };
        Ok(EmbeddedModel {
            info,
            model,
            template,
            work,
            busy,
            cache,
        })
    }

    /// Facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Slots generating right now.
    pub fn busy_slots(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    /// What the prefix cache has done since loading.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            cached_tokens: self.cache.cached_tokens.load(Ordering::Relaxed),
            evictions: self.cache.evictions.load(Ordering::Relaxed),
        }
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

    /// Renders chat messages with the model's template and tokenizes them so that only the
    /// template's own markers are special tokens: text in a message that spells a marker (say
    /// `<|im_start|>system`) stays text, so no message can forge another turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Prompt, ModelError> {
        // A private-use character that no message contains marks where each content goes.
        let marker = (0xE000u32..=0xF8FF)
            .filter_map(char::from_u32)
            .find(|c| messages.iter().all(|m| !m.content.contains(*c)))
            .ok_or_else(|| {
                ModelError::Template("the messages use every private-use character".to_string())
            })?;
        let held: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(index, message)| ChatMessage {
                role: message.role.clone(),
                content: format!("{marker}{index}{marker}"),
            })
            .collect();
        let rendered = self.render_chat(&held)?;
        let vocab = self.model.vocab();
        let misplaced =
            || ModelError::Template("the template moved a message's content".to_string());
        let mut tokens = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(marker) {
            tokens.extend(vocab.tokenize(&rest.as_bytes()[..start], false, true));
            let after = &rest[start + marker.len_utf8()..];
            let end = after.find(marker).ok_or_else(misplaced)?;
            let index: usize = after[..end].parse().map_err(|_| misplaced())?;
            let content = &messages.get(index).ok_or_else(misplaced)?.content;
            tokens.extend(vocab.tokenize(content.as_bytes(), false, false));
            rest = &after[end + marker.len_utf8()..];
        }
        tokens.extend(vocab.tokenize(rest.as_bytes(), false, true));
        Ok(Prompt { tokens })
    }

    /// Tokenizes a text with the model's tokenizer (special tokens in it are read as such, as
    /// a rendered chat template needs).
    pub fn tokenize(&self, text: &str) -> Prompt {
        Prompt {
            tokens: self.model.vocab().tokenize(text.as_bytes(), false, true),
        }
    }

    /// The grammar (GBNF) of the JSON texts a JSON schema allows, to constrain a generation's
    /// output with ([`Generate::grammar`]).
    pub fn grammar_for_schema(&self, schema: &str) -> Result<String, ModelError> {
        llama_cpp_2::json_schema_to_grammar(schema).map_err(|error| ModelError::Invalid {
            param: "tools",
            reason: format!("a schema could not be made a grammar: {error}"),
        })
    }

    /// Counts a text's tokens with the model's tokenizer.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenize(text).len()
    }

    /// Starts a generation. Its events arrive on the returned [`Generation`]; it waits for a free
    /// slot if all are busy.
    pub fn generate(&self, request: Generate) -> Result<Generation, ModelError> {
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
        request.sampling.check()?;
        let n_ctx = self.info.n_ctx as usize;
        if request.prompt.is_empty() || request.prompt.len() + request.max_tokens > n_ctx {
            return Err(ModelError::ContextLengthExceeded {
                n_ctx: self.info.n_ctx,
                prompt_tokens: request.prompt.len(),
                max_tokens: request.max_tokens,
            });
        }
        let (sender, receiver) = events::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.work
            .try_send(Job {
                request,
                events: sender,
                cancel: Arc::clone(&cancel),
            })
            .map_err(|error| match error {
                mpsc::TrySendError::Full(_) => ModelError::Busy,
                mpsc::TrySendError::Disconnected(_) => {
                    ModelError::Failed("the worker is gone".to_string())
                }
            })?;
        Ok(Generation {
            events: receiver,
            cancel,
        })
    }
}

/// Text as it is generated: holds back an incomplete UTF-8 character, and whatever could still
/// be the start of a stop sequence, and cuts the text before the first stop sequence found.
struct TextStream {
    stop: Vec<String>,
    /// The most characters held back for a stop sequence that may be starting.
    hold_chars: usize,
    /// Bytes generated, not yet valid UTF-8.
    bytes: Vec<u8>,
    /// Text decoded, not yet sent.
    text: String,
}

impl TextStream {
    fn new(stop: Vec<String>) -> TextStream {
        let hold_chars = stop
            .iter()
            .map(|stop| stop.chars().count())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        TextStream {
            stop,
            hold_chars,
            bytes: Vec::new(),
            text: String::new(),
        }
    }

    /// Adds a token's bytes. Returns the text that is safe to send now, and whether a stop
    /// sequence ended the generation (then the text returned is the last).
    fn push(&mut self, piece: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(piece);
        let valid = match std::str::from_utf8(&self.bytes) {
            Ok(all) => all.len(),
            Err(error) => error.valid_up_to(),
        };
        let decoded: Vec<u8> = self.bytes.drain(..valid).collect();
        self.text.push_str(&String::from_utf8_lossy(&decoded));
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|stop| self.text.find(stop.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.bytes.clear();
            return (std::mem::take(&mut self.text), true);
        }
        // Send all but the last `hold_chars` characters.
        let keep_from = if self.hold_chars == 0 {
            self.text.len()
        } else {
            self.text
                .char_indices()
                .rev()
                .nth(self.hold_chars - 1)
                .map_or(0, |(index, _)| index)
        };
        (self.text.drain(..keep_from).collect(), false)
    }

    /// What is left at the end (no stop sequence was found in it).
    fn finish(mut self) -> String {
        if !self.bytes.is_empty() {
            self.text.push_str(&String::from_utf8_lossy(&self.bytes));
        }
        self.text
    }
}

/// One generation in a slot.
struct Slot {
    seq: i32,
    job: Job,
    sampler: LlamaSampler,
    /// Prompt tokens read so far: reused from the cache, then decoded.
    fed: usize,
    /// Prompt tokens reused from the slot's cache.
    cached: usize,
    /// The last token sampled, to be decoded next.
    next: Option<LlamaToken>,
    /// The position `next` goes to.
    position: i32,
    completion_tokens: usize,
    text: TextStream,
    /// Where this slot's logits are in the batch just decoded.
    logits_at: Option<i32>,
}

impl Slot {
    fn counts(&self) -> TokenCounts {
        TokenCounts {
            prompt_tokens: self.fed,
            cached_prompt_tokens: self.cached,
            completion_tokens: self.completion_tokens,
        }
    }

    fn send(&self, event: Event) {
        // A listener that left is noticed before the next step (`Job::abandoned`).
        let _ = self.job.events.send(event);
    }
}

/// What a slot's sequence holds in the KV cache: the tokens at positions 0, 1, …, in order,
/// and whose they are.
#[derive(Default)]
struct Kept {
    owner: u64,
    tokens: Vec<LlamaToken>,
    /// How many of `tokens` were the last request's prompt (the rest, its answer).
    prompt_tokens: usize,
    /// When a generation last took the slot (an admission count): the least recent is evicted
    /// first.
    used: u64,
}

/// The counters the worker shares with the model's handle.
struct Shared<'a> {
    busy: &'a AtomicUsize,
    cache: &'a CacheCounters,
}

/// The slots and the context they share.
struct Slots<'a> {
    model: &'a LlamaModel,
    context: LlamaContext<'a>,
    slots: Vec<Option<Slot>>,
    /// Per slot, what its sequence holds (whether or not a generation is in it).
    kept: Vec<Kept>,
    prefix_cache: PrefixCache,
    /// Admissions so far: the clock of least recent use.
    admissions: u64,
    n_ctx: u32,
    n_batch: usize,
    shared: Shared<'a>,
}

/// How many tokens `a` and `b` begin with in common.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(a, b)| a == b).count()
}

impl Slots<'_> {
    fn active(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_some()).count()
    }

    /// Takes waiting jobs into free slots; blocks when nothing is running. Returns false when
    /// the model was dropped and nothing is left to do.
    fn admit(&mut self, jobs: &mpsc::Receiver<Job>) -> bool {
        while self.active() < self.slots.len() {
            let job = if self.active() == 0 {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return false,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => return true,
                }
            };
            if job.abandoned() {
                continue; // it left while waiting: nothing was computed
            }
            let request = &job.request;
            let prompt_tokens = request.prompt.len();
            // `generate` checked this already; llama.cpp would abort on a position past the
            // context, so it is checked again right where it matters.
            if prompt_tokens == 0 || prompt_tokens + request.max_tokens > self.n_ctx as usize {
                let _ = job.events.send(Event::Failed {
                    error: ModelError::ContextLengthExceeded {
                        n_ctx: self.n_ctx,
                        prompt_tokens,
                        max_tokens: request.max_tokens,
                    },
                    counts: TokenCounts::default(),
                });
                continue;
            }
            let grammar = match request.grammar.as_deref() {
                None => None,
                Some(grammar) => match LlamaSampler::grammar(self.model, grammar, "root") {
                    Ok(sampler) => Some(sampler),
                    Err(error) => {
                        let _ = job.events.send(Event::Failed {
                            error: ModelError::Invalid {
                                param: "tools",
                                reason: format!("the output grammar does not compile: {error}"),
                            },
                            counts: TokenCounts::default(),
                        });
                        continue;
                    }
                },
            };
            if job.events.send(Event::Started { prompt_tokens }).is_err() {
                continue;
            }
            let (index, cached) = self.place(request);
            let sampler = request.sampling.sampler(self.model.n_vocab(), grammar);
            let text = TextStream::new(request.stop.clone());
            self.slots[index] = Some(Slot {
                seq: index as i32,
                job,
                sampler,
                fed: cached,
                cached,
                next: None,
                position: cached as i32,
                completion_tokens: 0,
                text,
                logits_at: None,
            });
            self.shared.busy.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Chooses a free slot for `request` and readies its cache. Returns the slot and how many
    /// prompt tokens it already holds. In order of preference:
    /// 1. the slot whose kept tokens begin with the longest part of the prompt that this request
    ///    may reuse, if that part is the slot's whole last prompt (a repeat, or a conversation's
    ///    next turn) or at least what reusing it throws away (its tail past it);
    /// 2. an empty slot;
    /// 3. the slot with the longest such part, whatever it throws away;
    /// 4. the slot used least recently, cleared (an eviction).
    fn place(&mut self, request: &Generate) -> (usize, usize) {
        let prompt = &request.prompt.tokens;
        let reusable = |kept: &Kept| match self.prefix_cache {
            PrefixCache::PerOwner => kept.owner == request.owner,
            PrefixCache::Shared => true,
            PrefixCache::Off => false,
        };
        let rank = |index: usize| {
            let kept = &self.kept[index];
            // At least the prompt's last token is decoded: its logits give the first token.
            let prefix = if reusable(kept) {
                common_prefix(&kept.tokens, prompt).min(prompt.len() - 1)
            } else {
                0
            };
            let lost = kept.tokens.len() - prefix.min(kept.tokens.len());
            // The prompt's last token is never reused, so a repeat reuses all but that one.
            let continues = prefix + 1 >= kept.prompt_tokens;
            let rank = if prefix > 0 && (continues || lost <= prefix) {
                (3, prefix, kept.used)
            } else if kept.tokens.is_empty() {
                (2, 0, 0)
            } else if prefix > 0 {
                (1, prefix, kept.used)
            } else {
                (0, 0, u64::MAX - kept.used)
            };
            (rank, prefix)
        };
        let (index, mut cached) = (0..self.slots.len())
            .filter(|&index| self.slots[index].is_none())
            .map(|index| {
                let (rank, prefix) = rank(index);
                (rank, index, prefix)
            })
            .max()
            .map_or((0, 0), |(_, index, prefix)| (index, prefix)); // `admit` places only when a slot is free
        let seq = index as u32;
        let kept = &mut self.kept[index];
        if cached == 0 && !kept.tokens.is_empty() {
            self.shared.cache.evictions.fetch_add(1, Ordering::Relaxed);
        }
        if kept.tokens.len() > cached {
            // Removing a tail can fail for some memory kinds (recurrent ones): then clear it all.
            let trimmed = self
                .context
                .clear_kv_cache_seq(Some(seq), Some(cached as u32), None);
            if !matches!(trimmed, Ok(true)) {
                let _ = self.context.clear_kv_cache_seq(Some(seq), None, None);
                cached = 0;
            }
        }
        kept.tokens.truncate(cached);
        kept.prompt_tokens = prompt.len();
        kept.owner = request.owner;
        self.admissions += 1;
        kept.used = self.admissions;
        if cached > 0 {
            self.shared.cache.hits.fetch_add(1, Ordering::Relaxed);
            self.shared
                .cache
                .cached_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
        }
        (index, cached)
    }

    /// Ends the generation in slot `index` with `last` and frees the slot; its cache stays for
    /// the next request that may reuse it, unless the cache is off.
    fn end(&mut self, index: usize, last: Event) {
        if let Some(slot) = self.slots[index].take() {
            if self.prefix_cache == PrefixCache::Off {
                self.forget(index);
            }
            // Free before the last event, so whoever reads it sees the slot free.
            self.shared.busy.fetch_sub(1, Ordering::Release);
            slot.send(last);
        }
    }

    /// Clears slot `index`'s cache.
    fn forget(&mut self, index: usize) {
        let _ = self
            .context
            .clear_kv_cache_seq(Some(index as u32), None, None);
        self.kept[index].tokens.clear();
    }

    /// One step: every generating slot's next token, and as much waiting prompt as fits, in one
    /// batch; then a token sampled for every slot that has logits.
    fn step(&mut self, batch: &mut LlamaBatch<'_>) {
        for index in 0..self.slots.len() {
            if let Some(slot) = &self.slots[index]
                && slot.job.abandoned()
            {
                let counts = slot.counts();
                self.end(index, Event::Cancelled { counts });
            }
        }
        batch.clear();
        let mut room = self.n_batch;
        for (slot, kept) in self.slots.iter_mut().zip(&mut self.kept) {
            let Some(slot) = slot else { continue };
            slot.logits_at = None;
            if let Some(token) = slot.next.take() {
                // Never fails: the batch holds n_batch ≥ slots tokens and these come first.
                if batch.add(token, slot.position, &[slot.seq], true).is_ok() {
                    slot.logits_at = Some(batch.n_tokens() - 1);
                    slot.position += 1;
                    kept.tokens.push(token);
                    room -= 1;
                }
            }
        }
        if room < self.n_batch {
            // Some slots are generating: keep this step short.
            room = room.min(PROMPT_TOKENS_PER_SHARED_STEP);
        }
        for (slot, kept) in self.slots.iter_mut().zip(&mut self.kept) {
            let Some(slot) = slot else { continue };
            let prompt = &slot.job.request.prompt.tokens;
            if room == 0 || slot.fed == prompt.len() {
                continue;
            }
            let take = room.min(prompt.len() - slot.fed);
            for (offset, token) in prompt[slot.fed..slot.fed + take].iter().enumerate() {
                let position = slot.fed + offset;
                let last = position + 1 == prompt.len();
                if batch
                    .add(*token, position as i32, &[slot.seq], last)
                    .is_err()
                {
                    break;
                }
                kept.tokens.push(*token);
                if last {
                    slot.logits_at = Some(batch.n_tokens() - 1);
                }
            }
            slot.fed += take;
            slot.position = slot.fed as i32;
            room -= take;
        }
        if batch.n_tokens() == 0 {
            return;
        }
        if let Err(error) = self.context.decode(batch) {
            // The whole batch failed: every slot in it stops, none is left half-decoded, and
            // what their caches hold is no longer known.
            for index in 0..self.slots.len() {
                if let Some(slot) = &self.slots[index] {
                    let counts = slot.counts();
                    self.forget(index);
                    self.end(
                        index,
                        Event::Failed {
                            error: ModelError::Failed(error.to_string()),
                            counts,
                        },
                    );
                }
            }
            return;
        }
        for index in 0..self.slots.len() {
            if let Some(ending) = self.sample(index) {
                self.end(index, ending);
            }
        }
    }

    /// Samples slot `index`'s next token if it has logits; returns its final event if it ended.
    fn sample(&mut self, index: usize) -> Option<Event> {
        let vocab = self.model.vocab();
        let n_ctx = self.n_ctx;
        let slot = self.slots[index].as_mut()?;
        let at = slot.logits_at.take()?;
        let token = slot.sampler.sample(&self.context, at);
        let done = |slot: &mut Slot, finish| {
            let rest = std::mem::replace(&mut slot.text, TextStream::new(Vec::new())).finish();
            if !rest.is_empty() {
                slot.send(Event::Text(rest));
            }
            Some(Event::Done {
                counts: slot.counts(),
                finish,
            })
        };
        if vocab.is_eog(token) {
            return done(slot, FinishReason::Stop);
        }
        slot.completion_tokens += 1;
        let (ready, stopped) = slot.text.push(&vocab.token_to_piece(token, false, None));
        if !ready.is_empty() {
            slot.send(Event::Text(ready));
        }
        if stopped {
            return Some(Event::Done {
                counts: slot.counts(),
                finish: FinishReason::Stop,
            });
        }
        if slot.completion_tokens >= slot.job.request.max_tokens
            || slot.position as u32 + 1 >= n_ctx
        {
            return done(slot, FinishReason::Length);
        }
        slot.next = Some(token);
        None
    }
}

fn worker(
    backend: &'static LlamaBackend,
    model: &LlamaModel,
    options: LoadOptions,
    ready: mpsc::Sender<Result<u32, ModelError>>,
    jobs: mpsc::Receiver<Job>,
    shared: Shared<'_>,
) {
    let slots = options.slots;
    let n_ctx = options.n_ctx.min(model.n_ctx_train()).max(64);
    // Every step holds one token per generating slot, so a batch is never smaller than that.
    let n_batch = options.n_batch.max(slots).max(16);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx * slots))
        .with_n_seq_max(slots)
        .with_kv_unified(false)
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(options.n_threads)
        .with_n_threads_batch(options.n_threads);
    let context = match model.new_context(backend, params) {
        Ok(context) => context,
        Err(error) => {
            let _ = ready.send(Err(ModelError::Failed(format!(
                "cannot make the model's context: {error}"
            ))));
            return;
        }
    };
    // llama.cpp may round the context; each slot gets its share and no more.
    let n_ctx = n_ctx.min(context.n_ctx() / slots);
    if ready.send(Ok(n_ctx)).is_err() {
        return;
    }
    let mut state = Slots {
        model,
        context,
        slots: (0..slots).map(|_| None).collect(),
        kept: (0..slots).map(|_| Kept::default()).collect(),
        prefix_cache: options.prefix_cache,
        admissions: 0,
        n_ctx,
        n_batch: n_batch as usize,
        shared,
    };
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    while state.admit(&jobs) {
        state.step(&mut batch);
    }
}

/// What a finished generation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The text.
    pub text: String,
    /// What was computed.
    pub counts: TokenCounts,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Collects a generation into its text, counts and finish reason, blocking the thread.
pub fn collect(mut generation: Generation) -> Result<Completion, ModelError> {
    let mut text = String::new();
    while let Some(event) = generation.blocking_recv() {
        match event {
            Event::Started { .. } => {}
            Event::Text(piece) => text.push_str(&piece),
            Event::Done { counts, finish } => {
                return Ok(Completion {
                    text,
                    counts,
                    finish,
                });
            }
            Event::Cancelled { .. } => {
                return Err(ModelError::Failed(
                    "the generation was cancelled".to_string(),
                ));
            }
            Event::Failed { error, .. } => return Err(error),
        }
    }
    Err(ModelError::Failed(
        "the generation ended without finishing".to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool, String) {
        let mut stream = TextStream::new(stop.iter().map(|s| s.to_string()).collect());
        let mut sent = Vec::new();
        for piece in pieces {
            let (ready, stopped) = stream.push(piece);
            if !ready.is_empty() {
                sent.push(ready);
            }
            if stopped {
                return (sent, true, String::new());
            }
        }
        (sent, false, stream.finish())
    }

    #[test]
    fn incomplete_utf8_is_held_back() {
        let euro = "€".as_bytes(); // three bytes
        let (sent, stopped, rest) = run(&[], &[b"a", &euro[..1], &euro[1..], b"b"]);
        assert_eq!(sent, vec!["a", "€", "b"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn a_stop_sequence_across_pieces_is_never_sent() {
        let (sent, stopped, _) = run(&["END"], &[b"hello E", b"N", b"D more"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "hello ");
        // A partial match that turns out not to be one is sent after all.
        let (sent, stopped, rest) = run(&["END"], &[b"hello E", b"NOUGH"]);
        assert!(!stopped);
        assert_eq!(sent.concat() + &rest, "hello ENOUGH");
    }

    #[test]
    fn every_prefix_cache_mode_is_read_back_from_its_name() {
        for mode in PrefixCache::ALL {
            assert_eq!(PrefixCache::from_name(mode.name()), Some(mode));
        }
        assert_eq!(PrefixCache::default().name(), "person");
        assert_eq!(PrefixCache::from_name("everyone"), None);
        assert_eq!(PrefixCache::from_name("Person"), None);
    }
}
