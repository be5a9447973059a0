//! Loading the configuration: `-f FILE_OR_DIR`, repeatable, multi-document
//! YAML, directories' `*.yaml` and `*.yml` files read in sorted order (not
//! recursively, as `kubectl -f`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{API_VERSION, BlueprintSpec, PipelineSpec, SourceSpec};
use crate::{Error, Result, yaml};

/// One named object of the configuration and the file it came from.
#[derive(Debug, Clone)]
pub struct Named<T> {
    /// `metadata.name`.
    pub name: String,
    /// The object's spec.
    pub spec: T,
    /// The file that defined it, as the user named it.
    pub file: PathBuf,
}

impl<T> Named<T> {
    /// The directory relative paths in this object resolve against.
    pub fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    /// Resolves a path named by this object against its file's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir().join(path)
        }
    }
}

/// Every Source, Blueprint and Pipeline, by name (sorted).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The sources.
    pub sources: BTreeMap<String, Named<SourceSpec>>,
    /// The blueprints.
    pub blueprints: BTreeMap<String, Named<BlueprintSpec>>,
    /// The pipelines.
    pub pipelines: BTreeMap<String, Named<PipelineSpec>>,
}

impl Config {
    /// Loads every file and directory in `paths`, then checks references
    /// between objects. All problems are reported, not only the first.
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        let mut config = Config::default();
        let mut errors = Vec::new();
        for file in files(paths)? {
            if let Err(e) = config.load_file(&file) {
                errors.push(e);
            }
        }
        if config.sources.is_empty() && config.blueprints.is_empty() && errors.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            errors.push(Error::config(
                names.join(", "),
                "no Source or Blueprint found",
            ));
        }
        errors.extend(config.check_references());
        Error::all(errors)?;
        Ok(config)
    }

    /// A configuration of objects read elsewhere (the controller reads them
    /// from the cluster), checked as [`Config::load`] checks files.
    pub fn assemble(
        sources: Vec<Named<SourceSpec>>,
        blueprints: Vec<Named<BlueprintSpec>>,
        pipelines: Vec<Named<PipelineSpec>>,
    ) -> Result<Self> {
        let config = Config {
            sources: by_name(sources),
            blueprints: by_name(blueprints),
            pipelines: by_name(pipelines),
        };
        Error::all(config.check_references())?;
        Ok(config)
    }

    fn load_file(&mut self, file: &Path) -> Result<()> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::config(file.display(), format!("cannot read: {e}")))?;
        let documents: Vec<Value> = yaml::from_str_multi(&text, &file.display().to_string())?;
        let mut errors = Vec::new();
        for (index, document) in documents.into_iter().enumerate() {
            if document.is_null() {
                continue;
            }
            if let Err(e) = self.add(file, index + 1, document) {
                errors.push(e);
            }
        }
        Error::all(errors)
    }

    fn add(&mut self, file: &Path, index: usize, document: Value) -> Result<()> {
        let at =
            |message: String| Error::config(file.display(), format!("document {index}: {message}"));
        let Value::Object(mut object) = document else {
            return Err(at(
                "expected a mapping with apiVersion, kind, metadata and spec".into(),
            ));
        };
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if api_version != API_VERSION {
            return Err(at(format!(
                "apiVersion must be {API_VERSION}, found {}",
                if api_version.is_empty() {
                    "none"
                } else {
                    api_version
                }
            )));
        }
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = object
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .ok_or_else(|| at(format!("{kind} has no metadata.name")))?;
        for key in object.keys() {
            if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
                return Err(at(format!("{kind} {name}: unknown field {key}")));
            }
        }
        let spec = object.remove("spec").unwrap_or(Value::Null);
        let origin = {
            let origin = format!("{}: {kind} {name}", file.display());
            move || origin.clone()
        };
        match kind.as_str() {
            "Source" => insert(
                &mut self.sources,
                name,
                parse(spec, origin)?,
                file,
                "Source",
            ),
            "Blueprint" => insert(
                &mut self.blueprints,
                name,
                parse(spec, origin)?,
                file,
                "Blueprint",
            ),
            "Pipeline" => insert(
                &mut self.pipelines,
                name,
                parse(spec, origin)?,
                file,
                "Pipeline",
            ),
            "" => Err(at("no kind".into())),
            other => Err(at(format!(
                "unknown kind {other} (expected Source, Blueprint or Pipeline)"
            ))),
        }
    }

    /// Problems that involve more than one field: references to missing
    /// objects, fields that exclude each other, duplicate resource ids.
    fn check_references(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        for source in self.sources.values() {
            let at = |message: &str| {
                Error::config(
                    source.file.display(),
                    format!("Source {}: {message}", source.name),
                )
            };
            let spec = &source.spec;
            match (&spec.url, &spec.url_from, &spec.kubernetes) {
                (None, None, None) => {
                    errors.push(at("spec.url, spec.urlFrom or spec.kubernetes is required"))
                }
                (Some(_), Some(_), _) => errors.push(at("set url or urlFrom, not both")),
                (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => errors.push(at(
                    "spec.kubernetes reads objects, not a URL: set one of them",
                )),
                (None, Some(from), None) if from.env.is_none() && from.secret_key_ref.is_none() => {
                    errors.push(at("spec.urlFrom needs env or secretKeyRef"))
                }
                _ => {}
            }
            match &spec.kubernetes {
                Some(objects) => {
                    if objects.api_version.is_empty() || objects.kind.is_empty() {
                        errors.push(at("spec.kubernetes needs apiVersion and kind"));
                    }
                    if spec.query.is_some() || spec.seed_file.is_some() {
                        errors.push(at(
                            "spec.query and spec.seedFile are for SQL sources, not spec.kubernetes",
                        ));
                    }
                }
                None if spec.key.is_empty() => errors.push(at("spec.key must name a column")),
                None => {}
            }
            if let Some(notify) = &spec.notify
                && let Some(problem) = crate::source::notify_problem(spec, &notify.channel)
            {
                errors.push(at(&problem));
            }
        }
        for blueprint in self.blueprints.values() {
            let at = |message: String| {
                Error::config(
                    blueprint.file.display(),
                    format!("Blueprint {}: {message}", blueprint.name),
                )
            };
            if !crate::template::is_dns_label(&blueprint.name) {
                errors.push(at(format!(
                    "metadata.name {:?} must be a DNS label (lowercase letters, digits and '-', at most 63): it names a directory and a label value",
                    blueprint.name
                )));
            }
            if !self.sources.contains_key(&blueprint.spec.source) {
                errors.push(at(format!(
                    "spec.source: no Source named {}",
                    blueprint.spec.source
                )));
            }
            if blueprint.spec.resources.is_empty() {
                errors.push(at(
                    "spec.resources: a blueprint needs at least one resource".into(),
                ));
            }
            let mut seen = BTreeMap::new();
            for (i, resource) in blueprint.spec.resources.iter().enumerate() {
                let field = format!("spec.resources[{i}]");
                if !crate::template::is_dns_label(&resource.id) {
                    errors.push(at(format!(
                        "{field}.id: {:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                        resource.id
                    )));
                }
                if let Some(first) = seen.insert(resource.id.as_str(), i) {
                    errors.push(at(format!(
                        "{field}.id: {} is already the id of spec.resources[{first}]",
                        resource.id
                    )));
                }
                let set = [
                    resource.template.is_some(),
                    resource.template_file.is_some(),
                    resource.template_from.is_some(),
                ];
                match set.iter().filter(|s| **s).count() {
                    0 => errors.push(at(format!(
                        "{field} (id {}): template or templateFile is required",
                        resource.id
                    ))),
                    1 if resource.template_from.is_some() => errors.push(at(format!(
                        "{field} (id {}): templateFrom reads a ConfigMap, which only `kiln controller` can; use template or templateFile",
                        resource.id
                    ))),
                    1 => {}
                    _ => errors.push(at(format!(
                        "{field} (id {}): set one of template, templateFile and templateFrom",
                        resource.id
                    ))),
                }
            }
        }
        for pipeline in self.pipelines.values() {
            if pipeline.spec.service_account_name.is_some() {
                errors.push(Error::config(
                    pipeline.file.display(),
                    format!(
                        "Pipeline {}: spec.serviceAccountName is for `kiln controller`, which acts as that ServiceAccount; the CLI acts as its kubeconfig's user",
                        pipeline.name
                    ),
                ));
            }
            for name in &pipeline.spec.blueprints {
                if !self.blueprints.contains_key(name) {
                    errors.push(Error::config(
                        pipeline.file.display(),
                        format!(
                            "Pipeline {}: spec.blueprints: no Blueprint named {name}",
                            pipeline.name
                        ),
                    ));
                }
            }
            if let Some(guard) = &pipeline.spec.deletion_guard
                && guard.max_percent > 100
            {
                errors.push(Error::config(
                    pipeline.file.display(),
                    format!(
                        "Pipeline {}: spec.deletionGuard.maxPercent must be between 0 and 100, found {}",
                        pipeline.name, guard.max_percent
                    ),
                ));
            }
            if let Err(e) = crate::rollout::Strategy::of(pipeline, &self.blueprints_of(pipeline)) {
                errors.push(e);
            }
        }
        errors
    }
}

impl Config {
    /// The blueprints `pipeline` renders: its `spec.blueprints`, or all.
    pub fn blueprints_of(&self, pipeline: &Named<PipelineSpec>) -> Vec<&BlueprintSpec> {
        self.blueprints
            .values()
            .filter(|b| {
                pipeline.spec.blueprints.is_empty() || pipeline.spec.blueprints.contains(&b.name)
            })
            .map(|b| &b.spec)
            .collect()
    }
}

fn by_name<T>(objects: Vec<Named<T>>) -> BTreeMap<String, Named<T>> {
    objects.into_iter().map(|o| (o.name.clone(), o)).collect()
}

/// The files named by `paths`: files as given (YAML or JSON), and the
/// `*.yaml` and `*.yml` files of directories in sorted order. JSON files in a
/// directory are left alone: they are as often a file source's rows.
fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path)
            .map_err(|e| Error::config(path.display(), format!("cannot read: {e}")))?;
        if !metadata.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path)
            .map_err(|e| Error::config(path.display(), format!("cannot read directory: {e}")))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml"))
            })
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

fn parse<T: DeserializeOwned>(spec: Value, origin: impl Fn() -> String) -> Result<T> {
    if spec.is_null() {
        return Err(Error::config(origin(), "spec is required"));
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        Error::config(origin(), format!("{field}: {message}"))
    })
}

fn insert<T>(
    map: &mut BTreeMap<String, Named<T>>,
    name: String,
    spec: T,
    file: &Path,
    kind: &str,
) -> Result<()> {
    if let Some(existing) = map.get(&name) {
        return Err(Error::config(
            file.display(),
            format!(
                "{kind} {name} is already defined in {}",
                existing.file.display()
            ),
        ));
    }
    map.insert(
        name.clone(),
        Named {
            name,
            spec,
            file: file.to_path_buf(),
        },
    );
    Ok(())
}
