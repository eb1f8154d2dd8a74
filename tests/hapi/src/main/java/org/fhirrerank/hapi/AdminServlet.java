package org.fhirrerank.hapi;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;

import java.io.IOException;

/**
 * Test controls on {@code /admin/*} (loopback only, like the whole server):
 * {@code POST /admin/auth {"token": "Bearer x", "forbid": "Bearer y"}} demands a token on
 * /fhir (both null: open again); {@code POST /admin/reset} opens it again.
 */
public class AdminServlet extends HttpServlet {

	private final BearerTokenInterceptor auth;
	private final ObjectMapper json = new ObjectMapper();

	public AdminServlet(BearerTokenInterceptor auth) {
		this.auth = auth;
	}

	@Override
	protected void doPost(HttpServletRequest request, HttpServletResponse response) throws IOException {
		String action = request.getPathInfo() == null ? "" : request.getPathInfo();
		switch (action) {
			case "/auth" -> {
				JsonNode body = json.readTree(request.getInputStream());
				auth.configure(text(body, "token"), text(body, "forbid"));
			}
			case "/reset" -> auth.configure(null, null);
			default -> {
				response.sendError(404, "Unknown admin action " + action);
				return;
			}
		}
		response.setContentType("application/json");
		response.getWriter().write("{\"ok\":true}");
	}

	private static String text(JsonNode body, String field) {
		if (body == null || !body.hasNonNull(field)) {
			return null;
		}
		return body.get(field).asText();
	}
}
