//! What Slack checks in a webhook's Block Kit payload, for the stand-in: Slack answers 400
//! `invalid_blocks` when a message has more than 50 blocks, a section text over 3,000
//! characters, a field over 2,000 or more than 10 fields, a header that is not plain text or
//! is over 150 characters, a block type it does not know, or a text object without text.
//! (https://api.slack.com/reference/block-kit/blocks)

use serde_json::Value;

pub const MAX_BLOCKS: usize = 50;
pub const MAX_SECTION_TEXT: usize = 3000;
pub const MAX_FIELD: usize = 2000;
pub const MAX_FIELDS: usize = 10;
pub const MAX_HEADER: usize = 150;
pub const MAX_CONTEXT_ELEMENTS: usize = 10;

fn text_object(v: &Value, max: usize, what: &str) -> Result<(), String> {
    let kind = v["type"].as_str().unwrap_or("");
    if kind != "mrkdwn" && kind != "plain_text" {
        return Err(format!("{what}: text object of type `{kind}`"));
    }
    let t = v["text"].as_str().ok_or(format!("{what}: no text"))?;
    if t.is_empty() {
        return Err(format!("{what}: empty text"));
    }
    let n = t.chars().count();
    if n > max {
        return Err(format!("{what}: {n} characters, more than {max}"));
    }
    Ok(())
}

/// `Ok` when Slack would take the `blocks` of a message (absent blocks are fine).
pub fn check_slack_blocks(body: &Value) -> Result<(), String> {
    let Some(blocks) = body.get("blocks") else {
        return Ok(());
    };
    let blocks = blocks.as_array().ok_or("blocks is not an array")?;
    if blocks.len() > MAX_BLOCKS {
        return Err(format!("{} blocks, more than {MAX_BLOCKS}", blocks.len()));
    }
    for (i, b) in blocks.iter().enumerate() {
        match b["type"].as_str().unwrap_or("") {
            "header" => {
                if b["text"]["type"] != "plain_text" {
                    return Err(format!("block {i}: a header's text must be plain_text"));
                }
                text_object(&b["text"], MAX_HEADER, &format!("block {i} header"))?;
            }
            "section" => {
                let text = b.get("text");
                let fields = b.get("fields").and_then(Value::as_array);
                if text.is_none() && fields.is_none() {
                    return Err(format!("block {i}: a section needs text or fields"));
                }
                if let Some(t) = text {
                    text_object(t, MAX_SECTION_TEXT, &format!("block {i} section"))?;
                }
                if let Some(f) = fields {
                    if f.len() > MAX_FIELDS {
                        return Err(format!(
                            "block {i}: {} fields, more than {MAX_FIELDS}",
                            f.len()
                        ));
                    }
                    for (j, x) in f.iter().enumerate() {
                        text_object(x, MAX_FIELD, &format!("block {i} field {j}"))?;
                    }
                }
            }
            "context" => {
                let e = b["elements"]
                    .as_array()
                    .ok_or(format!("block {i}: no elements"))?;
                if e.is_empty() || e.len() > MAX_CONTEXT_ELEMENTS {
                    return Err(format!("block {i}: {} context elements", e.len()));
                }
                for (j, x) in e.iter().enumerate() {
                    text_object(x, MAX_SECTION_TEXT, &format!("block {i} element {j}"))?;
                }
            }
            "divider" => {}
            other => return Err(format!("block {i}: unknown block type `{other}`")),
        }
    }
    Ok(())
}
