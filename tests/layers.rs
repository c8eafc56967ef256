//! The architecture, checked: modules depend on each other one way, in the layers
//! docs/architecture.md draws, and no two files of `src/` import each other, directly or
//! around a circle.
//!
//! Every `use` and every path of `src/**/*.rs` that starts with `crate::` or `super::`
//! is read with `syn` and resolved to the file of the module it names (the longest
//! module prefix of the path). Code under `#[cfg(test)]` is left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Which top-level modules each may use (besides itself). `main.rs` is another crate;
/// `lib.rs` only declares the modules.
const ALLOWED: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("telemetry", &[]),
    ("config", &["domain"]),
    ("db", &["domain", "config"]),
    ("mail", &["domain", "config"]),
    ("queue", &["domain", "config", "telemetry", "db", "mail"]),
    ("http", &["domain", "config", "telemetry", "db"]),
    (
        "app",
        &[
            "domain",
            "config",
            "telemetry",
            "db",
            "mail",
            "queue",
            "http",
        ],
    ),
    ("demo", &["config", "http", "app"]),
    ("cli", &["domain"]),
    ("ops", &["domain", "config", "db", "cli"]),
];

/// A module path (`["db", "tasks"]`) and the file that holds it.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            if parts == ["main"] {
                continue;
            }
            found.insert(parts, path);
        }
    }
    found
}

/// Collects the paths a file names that start with `crate` or `super`, outside
/// `#[cfg(test)]`, as absolute module paths.
struct Uses<'a> {
    module: &'a [String],
    paths: Vec<Vec<String>>,
}

impl Uses<'_> {
    fn absolute(&self, segments: Vec<String>) -> Option<Vec<String>> {
        let mut iter = segments.into_iter().peekable();
        let mut base: Vec<String> = match iter.peek().map(String::as_str) {
            Some("crate") => {
                iter.next();
                Vec::new()
            }
            Some("super") => self.module.to_vec(),
            _ => return None,
        };
        while iter.peek().map(String::as_str) == Some("super") {
            iter.next();
            base.pop()?;
        }
        base.extend(iter.filter(|s| s != "self"));
        Some(base)
    }

    fn use_tree(&mut self, prefix: Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                let mut next = prefix;
                next.push(p.ident.to_string());
                self.use_tree(next, &p.tree);
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix;
                full.push(n.ident.to_string());
                self.push(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix;
                full.push(r.ident.to_string());
                self.push(full);
            }
            syn::UseTree::Glob(_) => self.push(prefix),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix.clone(), item);
                }
            }
        }
    }

    fn push(&mut self, segments: Vec<String>) {
        if let Some(path) = self.absolute(segments) {
            self.paths.push(path);
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string().contains("test"))
    })
}

impl<'ast> Visit<'ast> for Uses<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Impl(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.push(segments);
        syn::visit::visit_path(self, path);
    }
}

/// The file-to-file dependencies of `src/`.
fn dependencies() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let mut edges = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read file");
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
        let mut uses = Uses {
            module,
            paths: Vec::new(),
        };
        uses.visit_file(&parsed);
        let targets: BTreeSet<Vec<String>> = uses
            .paths
            .iter()
            .filter_map(|path| {
                (0..=path.len())
                    .rev()
                    .map(|n| path[..n].to_vec())
                    .find(|prefix| modules.contains_key(prefix))
            })
            .filter(|target| target != module && !target.is_empty())
            .collect();
        edges.insert(module.clone(), targets);
    }
    edges
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, targets) in dependencies() {
        let Some(top) = from.first() else { continue };
        let may = allowed
            .get(top.as_str())
            .unwrap_or_else(|| panic!("module {top} is not in ALLOWED: add it to its layer"));
        for to in targets {
            let to_top = to[0].as_str();
            if to_top != top && !may.contains(&to_top) {
                wrong.push(format!("{} uses {}", name(&from), name(&to)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependencies against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_files_depend_on_each_other_directly_or_around_a_circle() {
    let edges = dependencies();
    // Depth-first search; a back edge closes a circle.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, bool>,
        path: &mut Vec<Vec<String>>,
        circles: &mut Vec<String>,
    ) {
        state.insert(node.clone(), false);
        path.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next) {
                None => visit(next, edges, state, path, circles),
                Some(false) => {
                    let start = path.iter().position(|p| p == next).unwrap_or(0);
                    let circle: Vec<String> = path[start..]
                        .iter()
                        .chain([next])
                        .map(|m| name(m))
                        .collect();
                    circles.push(circle.join(" → "));
                }
                Some(true) => {}
            }
        }
        path.pop();
        state.insert(node.clone(), true);
    }
    let mut state = BTreeMap::new();
    let mut circles = Vec::new();
    for node in edges.keys() {
        if !state.contains_key(node) {
            visit(node, &edges, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "files that depend on each other:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_check_sees_the_dependencies_it_is_meant_to_forbid() {
    // A guard against a check that passes because it reads nothing.
    let edges = dependencies();
    let of = |m: &str| -> &BTreeSet<Vec<String>> {
        let key: Vec<String> = m.split("::").map(str::to_owned).collect();
        edges.get(&key).unwrap_or_else(|| panic!("{m} is a module"))
    };
    let db_tasks = vec!["db".to_owned(), "tasks".to_owned()];
    assert!(
        of("queue::recorder").contains(&db_tasks),
        "{:?}",
        of("queue::recorder")
    );
    assert!(of("http::batches").contains(&db_tasks));
    assert!(of("app").iter().any(|m| m[0] == "queue"));
}
