//! Cilium mutual-auth policy migration (zmesh_compat::cilium::migrate) on arbitrary YAML:
//! the translation, its renderings and report, and zmesh's own reading of each generated
//! AuthorizationPolicy (what the migration writes must be a policy zmesh accepts).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_compat::cilium::{migrate, Format, MigrateOptions};
use zmesh_proxy::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let inputs = [("fuzz.yaml".to_owned(), text.to_owned())];
    let migration = match migrate(&inputs, &MigrateOptions::default()) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = migration.report_text();
    let _ = migration.objects();
    for format in [Format::Yaml, Format::Json] {
        let _ = migration.render(format);
    }
    for generated in &migration.policies {
        if let Err(e) = Policy::from_json(generated) {
            panic!(
                "the migration generated an AuthorizationPolicy zmesh refuses: {e}\n{}",
                serde_json::to_string_pretty(generated).unwrap()
            );
        }
    }
});
