//! Builds the eBPF objects (`make -C ../ebpf`, the same build as `make ebpf`) and
//! generates `$OUT_DIR/builtin_catalog.rs`, which `src/builtin.rs` includes: every
//! `ebpf/build/<name>.o` is embedded under its file stem `<name>`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    if let Err(message) = run() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or("CARGO_MANIFEST_DIR has no parent")?
        .join("ebpf");

    watch_sources(&ebpf_dir)?;
    // The ebpf Makefile reads these with `?=`.
    for var in ["CLANG", "LLVM_STRIP", "LIBBPF_INCLUDE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    build_objects(&ebpf_dir)?;
    let objects = built_objects(&ebpf_dir.join("build"))?;
    if objects.is_empty() {
        return Err(format!(
            "make -C {} produced no objects in build/",
            ebpf_dir.display()
        ));
    }

    // Embed copies from OUT_DIR, so `make -C ebpf clean` cannot break a later
    // compile of the crate without the build script rerunning.
    let embed_dir = out_dir.join("ebpf");
    fs::create_dir_all(&embed_dir).map_err(|e| format!("creating {}: {e}", embed_dir.display()))?;
    let mut entries = Vec::new();
    for (name, path) in &objects {
        let target = embed_dir.join(format!("{name}.o"));
        fs::copy(path, &target)
            .map_err(|e| format!("copying {} to {}: {e}", path.display(), target.display()))?;
        entries.push((name.clone(), target));
    }

    let catalog = out_dir.join("builtin_catalog.rs");
    fs::write(&catalog, render_catalog(&entries)?)
        .map_err(|e| format!("writing {}: {e}", catalog.display()))
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("{name}: {e}"))
}

/// Reruns the build script when the Makefile, a source or a header changes.
fn watch_sources(ebpf_dir: &Path) -> Result<(), String> {
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Makefile").display()
    );
    for sub in ["src", "include"] {
        let dir = ebpf_dir.join(sub);
        println!("cargo:rerun-if-changed={}", dir.display());
        let listing = fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in listing {
            let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
    Ok(())
}

fn build_objects(ebpf_dir: &Path) -> Result<(), String> {
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    if Command::new(&clang).arg("--version").output().is_err() {
        return Err(format!(
            "`{clang}` not found: the eBPF objects in {} are built with clang -target bpf.\n\
             Install the toolchain: apt-get install -y clang llvm libbpf-dev (or set CLANG=/path/to/clang).",
            ebpf_dir.display()
        ));
    }

    let output = Command::new("make")
        .arg("-C")
        .arg(ebpf_dir)
        // A jobserver inherited from an outer make (make build -> cargo) is not
        // ours to use from here.
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .output()
        .map_err(|e| {
            format!(
                "running `make -C {}`: {e} (is make installed?)",
                ebpf_dir.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "`make -C {}` failed ({}):\n{}{}",
            ebpf_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// `(file stem, path)` of every `*.o` in `build_dir`, sorted by name.
fn built_objects(build_dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let listing =
        fs::read_dir(build_dir).map_err(|e| format!("reading {}: {e}", build_dir.display()))?;
    let mut objects = Vec::new();
    for entry in listing {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", build_dir.display()))?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("o") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("unexpected object name {}", path.display()));
        }
        objects.push((name.to_owned(), path));
    }
    objects.sort();
    Ok(objects)
}

fn render_catalog(entries: &[(String, PathBuf)]) -> Result<String, String> {
    let mut names = String::new();
    let mut arms = String::new();
    let mut statics = String::new();
    for (index, (name, path)) in entries.iter().enumerate() {
        let path = path
            .to_str()
            .ok_or_else(|| format!("non-UTF-8 path {}", path.display()))?;
        names.push_str(&format!("    {name:?},\n"));
        arms.push_str(&format!("        {name:?} => Some(&OBJECT_{index}.0),\n"));
        statics.push_str(&format!(
            "static OBJECT_{index}: &Aligned<[u8]> = &Aligned(*include_bytes!({path:?}));\n"
        ));
    }
    Ok(format!(
        "// @generated by node-agent/build.rs from ebpf/build/*.o; do not edit.\n\
         \n\
         /// File stems of the embedded objects, sorted.\n\
         static NAMES: &[&str] = &[\n{names}];\n\
         \n\
         fn lookup(name: &str) -> Option<&'static [u8]> {{\n    match name {{\n{arms}        _ => None,\n    }}\n}}\n\
         \n\
         {statics}"
    ))
}
