//! What the store fixtures in `tests/fixtures/` were made with, and how tests look at them.

use serde_json::Value;

use crate::daemon::TestStore;

/// The image imported as `a` into each fixture: every fifth block zero, the others a byte
/// pattern.
pub fn pattern() -> Vec<u8> {
    let mut d = Vec::with_capacity(1 << 20);
    for i in 0..256usize {
        for j in 0..4096usize {
            d.push(if i % 5 == 0 {
                0
            } else {
                ((i * 7 + j) % 251) as u8
            });
        }
    }
    d
}

/// The names `vdi list` shows, in its order.
pub fn names(store: &TestStore) -> Vec<String> {
    names_listed(store, &[])
}

/// The names `vdi list --json ARGS…` shows, in its order.
pub fn names_listed(store: &TestStore, args: &[&str]) -> Vec<String> {
    let mut a = vec!["vdi", "list", "--json"];
    a.extend_from_slice(args);
    let list: Value = store.json(&a);
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// The store's format version, as `df` reports it.
pub fn format(store: &TestStore) -> u64 {
    store.json(&["df", "--json"])["format_version"]
        .as_u64()
        .unwrap()
}

/// Opens the fixture `file` and checks what every fixture's test checks first: its format
/// `version`, the `listed` names, the contents of each of `exports` (a write flushed before
/// the kill -9 that ended the fixture's making is in its log: replayed), and that `check`
/// finds it clean.
pub fn open_fixture(
    file: &str,
    version: u64,
    listed: &[&str],
    exports: &[(&str, &[u8])],
) -> TestStore {
    let store = TestStore::from_fixture(file);
    assert_eq!(format(&store), version, "{file}");
    assert_eq!(names(&store), listed, "{file}");
    for &(name, want) in exports {
        assert!(
            store.export(name) == want,
            "{file}: {name} does not hold what it held when the fixture was made"
        );
    }
    store.assert_clean();
    store
}
