-- Argo CD health of image.stratus.io/Image (resource.customizations.health.image.stratus.io_Image).
-- status.status is Glance's image status. Stratus does not write Image status yet (the node agents download an
-- image when a server boots from it): an Image without status is Healthy, as the API server stored it.
hs = {}
local st = obj.status
if st == nil or st.status == nil then
  hs.status = "Healthy"
  hs.message = "No status reported (images are fetched by the nodes that boot them)"
  return hs
end
local gen = obj.metadata and obj.metadata.generation
if gen ~= nil and st.observedGeneration ~= nil and st.observedGeneration < gen then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. tostring(gen) .. " to be observed"
  return hs
end
local function conditionMessage()
  if st.conditions ~= nil then
    for _, c in ipairs(st.conditions) do
      if c.status == "False" and c.message ~= nil then
        return c.message
      end
    end
  end
  return nil
end
local s = st.status
if s == "active" then
  hs.status = "Healthy"
elseif s == "killed" then
  hs.status = "Degraded"
  hs.message = conditionMessage() or "the image upload or download failed (killed)"
  return hs
elseif s == "deactivated" then
  hs.status = "Suspended"
else -- queued, saving, uploading, importing, pending_delete, deleted
  hs.status = "Progressing"
end
hs.message = s
return hs
